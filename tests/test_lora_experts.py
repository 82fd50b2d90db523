"""LoRA on experts in one process: the expert-specific path (``"hexamoe"`` + ``attach_lora``) against PEFT's own
parametrization on ``"eager"`` and against a naive per-expert loop (outputs, adapter gradients, no base gradients).

Tiny Mixtral (transformers stores ``[E, out, in]``: not transposed) and ds-hexamoe's ``HexaExperts`` with
``is_transposed`` set, torch path and Triton path (``TRITON_INTERPRET=1``), PEFT's ``disable_adapter()``, and
two active adapters refused.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

from ds_hexamoe.experts import attach_lora, factors_from_peft, factors_to_peft  # noqa: E402
from ds_hexamoe.experts.lora import LoraFactors, lora_linear  # noqa: E402
from ds_hexamoe.ops import build_expert_index  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = 1e-5


def mixtral(impl: str, seed: int = 0):
    import ds_hexamoe  # noqa: F401
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).float()


def lora_config(r: int = 4, **kw):
    return peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=TARGETS, **kw)


def randomize_adapters(model, seed: int = 1) -> None:
    """PEFT starts ``lora_B`` at zero (no effect); random factors make the comparison able to fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_pair(cfg=None):
    ref = peft.get_peft_model(mixtral("eager"), cfg or lora_config())
    ours = peft.get_peft_model(mixtral("hexamoe"), cfg or lora_config())
    randomize_adapters(ref)
    randomize_adapters(ours)
    attached = attach_lora(ours)
    assert len(attached) == 4 and attach_lora(ref) == []  # eager keeps PEFT's own path
    return ref, ours


def run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_factor_layouts_match_peft_delta():
    """``A[E, in, r] @ B[E, r, out] * scale`` equals PEFT's ``get_delta_weight`` (in the [E, in, out] orientation),
    and :func:`factors_to_peft` inverts :func:`factors_from_peft` exactly."""
    model = peft.get_peft_model(mixtral("eager"), lora_config(r=3))
    randomize_adapters(model)
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4
    for w in wrappers:
        a, b = factors_from_peft(w, "default")
        delta = torch.bmm(a, b) * w.scaling["default"]  # [E, in, out]
        stored = w.get_delta_weight("default")  # transformers' [E, out, in]
        assert stored.shape == w.get_param().shape
        assert torch.equal(delta.transpose(1, 2), stored) or rel(delta.transpose(1, 2), stored) < 1e-6
        wa, wb = factors_to_peft(a, b)
        assert torch.equal(wa, w.lora_A["default"].weight) and torch.equal(wb, w.lora_B["default"].weight)


def test_hexamoe_lora_equals_peft_eager():
    ref, ours = peft_pair()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    out_r, g_r = run(ref, ids)
    out_o, g_o = run(ours, ids)
    assert rel(out_o, out_r) < TOL
    assert set(g_r) == set(g_o) and any(".experts." in n and "lora_" in n for n in g_o)
    for n in g_r:
        assert rel(g_o[n], g_r[n]) < TOL, n
    base = [p for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert base and all(p.grad is None and not p.requires_grad for p in base)
    # no parametrization was ever registered on the experts
    assert not any(hasattr(m, "parametrizations") for m in ours.modules() if hasattr(m, "gate_up_proj"))
    # the adapter changes the output: the comparison above could fail
    with ours.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        plain_o, plain_r = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    assert rel(plain_o, plain_r) < TOL and rel(plain_o, out_o) > 1e-2


def test_two_active_adapters_refused():
    _, ours = peft_pair()
    ours.add_adapter("second", lora_config())
    attach_lora(ours)
    ours.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="adapters active at once"):
        ours(input_ids=torch.zeros(1, 4, dtype=torch.long))


def naive(x, w, lora: LoraFactors, top):
    """Per-expert loop: ``out[t] = sum_j x[t] (W_e + s A_e B_e)`` over the token's choices (no weights)."""
    out = torch.zeros(x.size(0), top.size(1), w.size(2), dtype=x.dtype)
    for t in range(x.size(0)):
        for j in range(top.size(1)):
            e = int(top[t, j])
            out[t, j] = x[t] @ w[e] + lora.scale * (x[t] @ lora.a[e]) @ lora.b[e]
    return out.reshape(-1, w.size(2))


@pytest.mark.parametrize("transposed", [False, True])
def test_lora_linear_against_loop(transposed):
    """:func:`lora_linear` (token-order input, pair-order output) equals the loop; frozen ``W`` gets no gradient,
    ``A`` and ``B`` get the loop's gradients, also for strided views (PEFT's layouts)."""
    g = torch.Generator().manual_seed(3)
    E, T, k, d_in, d_out, r = 3, 7, 2, 5, 6, 2
    w = torch.randn(E, d_out, d_in, generator=g)
    w = w.transpose(1, 2) if not transposed else w.transpose(1, 2).contiguous()  # both memory layouts
    a_store = torch.randn(E * r, d_in, generator=g).requires_grad_()
    b_store = torch.randn(d_out, r * E, generator=g).requires_grad_()
    x = torch.randn(T, d_in, generator=g, requires_grad=True)
    top = torch.randint(0, E, (T, k), generator=g)
    top[0] = 1  # an expert with more tokens than others; expert 2 may be empty

    def factors():
        a = a_store.view(E, r, d_in).transpose(1, 2)
        b = b_store.view(d_out, r, E).permute(2, 1, 0)
        return LoraFactors(a=a, b=b, scale=0.7)

    index = build_expert_index(top, E)
    y = lora_linear(x, w, index, factors(), gather_div=k, scatter=True)
    probe = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * probe).sum(), (x, a_store, b_store))
    y_ref = naive(x, w, factors(), top)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), (x, a_store, b_store))
    assert rel(y, y_ref) < TOL
    for got, want in zip(grads, grads_ref):
        assert rel(got, want) < TOL


def test_triton_path_interpreted():
    """The same comparison through the Triton kernels under ``TRITON_INTERPRET=1`` (a fresh process: the
    interpreter flag is read at import)."""
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "import test_lora_experts as t; from ds_hexamoe.ops import set_backend; set_backend('triton');"
        "from ds_hexamoe.ops import backend_name; assert backend_name(torch.device('cpu')) == 'triton';"
        "t.test_lora_linear_against_loop(False); t.test_lora_linear_against_loop(True); print('ok')"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def transposed_experts(seed: int = 0):
    """``HexaExperts`` storing ``[E, in, out]`` (``is_transposed``), inside a holder PEFT can target."""
    from ds_hexamoe.layers import HexaExperts

    class Transposed(HexaExperts):
        is_transposed = True

    torch.manual_seed(seed)
    experts = Transposed(4, 6, 5)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, torch.nn.Parameter(getattr(experts, name).transpose(1, 2).contiguous()))
    holder = torch.nn.Module()
    holder.experts = experts
    holder.forward = lambda x, top, w: holder.experts(x, top, w)
    return holder


@pytest.mark.parametrize("attach", [True, False])
def test_transposed_experts_against_loop(attach):
    """``is_transposed`` experts: PEFT keeps in/out unswapped; the expert-specific path (``attach``) and PEFT's
    own parametrization both equal a per-expert loop over ``W_e + get_delta_weight`` (outputs and grads)."""
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = peft.inject_adapter_in_model(cfg, transposed_experts())
    randomize_adapters(model, seed=5)
    assert len(attach_lora(model) if attach else []) == (2 if attach else 0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, generator=g)
    top = torch.randint(0, 4, (9, 2), generator=g)
    w = torch.rand(9, 2, generator=g)
    y = model.experts(x, top, w)
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = {m.parameter_name: m for m in model.modules() if isinstance(m, ParamWrapper)}
    base = wrappers["gate_up_proj"].get_base_layer()
    w1 = base.gate_up_proj + wrappers["gate_up_proj"].get_delta_weight("default")  # [E, d, 2f]
    w2 = base.down_proj + wrappers["down_proj"].get_delta_weight("default")  # [E, f, d]
    ref = torch.zeros(9, 6)
    for t in range(9):
        for j in range(2):
            e = int(top[t, j])
            gate, up = (x[t] @ w1[e]).chunk(2)
            ref[t] += w[t, j] * ((torch.nn.functional.silu(gate) * up) @ w2[e])
    probe = torch.randn(ref.shape, generator=g)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    got = torch.autograd.grad((y * probe).sum(), lora)
    want = torch.autograd.grad((ref * probe).sum(), lora)
    assert rel(y, ref) < TOL and rel(ref, model.experts.base_layer.base_layer(x, top, w)) > 1e-2
    for a, b in zip(got, want):
        assert rel(a, b) < TOL

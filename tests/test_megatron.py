"""Megatron-core experts backend: numbers against megatron's own SequentialMLP and Hugging Face's Mixtral block.

megatron-core 0.16's ``TopKRouter.gating`` moves its weight to ``torch.cuda.current_device()``, so a whole
``MoELayer.forward`` cannot run on a CPU-only machine. Everything after the gating matmul does: these tests
compute the logits with the same ``F.linear`` and then run megatron's own ``router.routing``, token
dispatcher, experts and combine on gloo ranks.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from ds_hexamoe.testing import run_distributed

megatron = pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install ds-hexamoe[megatron])")

from ds_hexamoe.patches.megatron import (  # noqa: E402
    HexaMoEMegatronExperts,
    convert_hf_mixtral_experts,
    convert_megatron_experts_to_hf,
    hexamoe_moe_spec,
    use_hexamoe_experts,
)


def _tiny_mixtral(num_layers=2, experts=4):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=num_layers,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------- conversion


def test_conversion_matches_transformers_own_checkpoint_format(tmp_path):
    """transformers writes legacy ``w1/w2/w3`` keys; converting them must give its in-memory v5 tensors."""
    from safetensors.torch import load_file

    model = _tiny_mixtral()
    model.save_pretrained(tmp_path)
    legacy = load_file(str(tmp_path / "model.safetensors"))
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in legacy)
    mg = convert_hf_mixtral_experts(legacy)
    v5 = model.state_dict()
    for l in range(2):
        assert torch.equal(mg[f"decoder.layers.{l}.mlp.experts.gate_up_proj"], v5[f"model.layers.{l}.mlp.experts.gate_up_proj"])
        assert torch.equal(mg[f"decoder.layers.{l}.mlp.experts.down_proj"], v5[f"model.layers.{l}.mlp.experts.down_proj"])
        assert torch.equal(mg[f"decoder.layers.{l}.mlp.router.weight"], v5[f"model.layers.{l}.mlp.gate.weight"])
    # v5 input gives the same result, and both directions round-trip exactly
    mg5 = convert_hf_mixtral_experts(v5)
    assert mg5.keys() == mg.keys() and all(torch.equal(mg5[k], mg[k]) for k in mg)
    back = convert_megatron_experts_to_hf(mg, layout="legacy")
    assert back.keys() == {k for k in legacy if "block_sparse_moe" in k}
    assert all(torch.equal(back[k], legacy[k]) for k in back)
    back5 = convert_megatron_experts_to_hf(mg, layout="v5")
    assert all(torch.equal(back5[k], v5[k]) for k in back5) and len(back5) == 6


def test_conversion_sequential_layout_and_expert_parallel_slices():
    v5 = _tiny_mixtral().state_dict()
    seq = convert_hf_mixtral_experts(v5, target="sequential")
    gu = v5["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(seq["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"], gu[3])
    back = convert_megatron_experts_to_hf(seq)
    assert all(torch.equal(back[k], v5[k]) for k in back) and len(back) == 6
    halves = [convert_hf_mixtral_experts(v5, ep_size=2, ep_rank=r) for r in range(2)]
    key = "decoder.layers.0.mlp.experts.down_proj"
    assert torch.equal(torch.cat([h[key] for h in halves]), v5["model.layers.0.mlp.experts.down_proj"])


def test_conversion_rejects_bad_input():
    v5 = _tiny_mixtral().state_dict()
    with pytest.raises(ValueError, match="target"):
        convert_hf_mixtral_experts(v5, target="grouped")
    with pytest.raises(ValueError, match="ep_size"):
        convert_hf_mixtral_experts(v5, ep_size=3)
    with pytest.raises(ValueError, match="no Mixtral expert weights"):
        convert_hf_mixtral_experts({"model.embed_tokens.weight": torch.zeros(2, 2)})
    legacy = convert_megatron_experts_to_hf(convert_hf_mixtral_experts(v5), layout="legacy")
    del legacy["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(ValueError, match=r"experts\.2\.w3"):
        convert_hf_mixtral_experts(legacy)
    with pytest.raises(ValueError, match="layout"):
        convert_megatron_experts_to_hf({}, layout="gguf")


# ---------------------------------------------------------------------------------------------- numerics


def _megatron_config(gated: bool, bias: bool, ep: int = 1):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, moe_ffn_hidden_size=24,
        num_moe_experts=4, moe_router_topk=2, use_cpu_initialization=True, gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu, add_bias_linear=bias, bias_activation_fusion=False,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, params_dtype=torch.float32,
        expert_model_parallel_size=ep, init_method_std=0.2,
    )


def _run_layer(layer, x):
    """megatron's MoELayer.forward after its CUDA-only gating matmul: routing, dispatch, experts, combine."""
    import torch.nn.functional as F

    logits = F.linear(x.reshape(-1, x.size(-1)), layer.router.weight, layer.router.bias)
    probs, routing_map = layer.router.routing(logits)
    h, p = layer.preprocess(x, probs, routing_map)
    h, p = layer.dispatch(h, p)
    out, _ = layer.routed_experts_compute(h, p)
    return layer.postprocess(layer.combine(out), None)


def _init_megatron(ep: int):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)


def _vs_sequential(rank, world):
    """Gated SwiGLU experts, no bias, against megatron's own SequentialMLP (same routing and dispatcher)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    cfg = _megatron_config(gated=True, bias=False)
    torch.manual_seed(0)
    ref = build_module(get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False), config=cfg)
    ours = build_module(hexamoe_moe_spec(4), config=cfg)
    assert isinstance(ours.experts, HexaMoEMegatronExperts)
    # SequentialMLP keys -> HF -> HexaMoE keys: exercises both converters
    hf = convert_megatron_experts_to_hf({f"decoder.layers.0.mlp.{k}": v for k, v in ref.state_dict().items()})
    ours.load_state_dict({k.removeprefix("decoder.layers.0.mlp."): v for k, v in convert_hf_mixtral_experts(hf).items()})
    x = torch.randn(7, 3, 16)
    outs = []
    for layer in (ref, ours):
        xi = x.clone().requires_grad_(True)
        y = _run_layer(layer, xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.router.weight.grad))
    local = ref.experts.local_experts
    return {
        "y": (outs[0][0], outs[1][0]), "dx": (outs[0][1], outs[1][1]), "drouter": (outs[0][2], outs[1][2]),
        "dw1": (torch.stack([m.linear_fc1.weight.grad for m in local]), ours.experts.gate_up_proj.grad),
        "dw2": (torch.stack([m.linear_fc2.weight.grad for m in local]), ours.experts.down_proj.grad),
    }


def _vs_naive(rank, world, gated):
    """Experts with biases against a naive per-expert loop on megatron's routing.

    megatron-core 0.16's SequentialMLP cannot run with biases on torch 2.13 (its ``MLP.forward`` adds the
    prob-scaled bias in place on a custom-Function view and autograd refuses), hence the loop.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(0)
    layer = build_module(hexamoe_moe_spec(4), config=_megatron_config(gated=gated, bias=True))
    ex = layer.experts
    up = "gate_up_proj" if gated else "up_proj"
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() <= 2:  # biases (and the router weight) away from zero
                p.normal_()
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x = torch.randn(7, 3, 16)
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)
    # naive: every token through every selected expert, weighted by megatron's probabilities
    xr = x.clone().requires_grad_(True)
    x2 = xr.reshape(-1, 16)
    logits = F.linear(x2, leaves["router.weight"], leaves["router.bias"])
    probs, routing_map = layer.router.routing(logits)
    y = torch.zeros_like(x2)
    for e in range(4):
        rows = routing_map[:, e].nonzero().flatten()
        h = F.linear(x2[rows], leaves[f"experts.{up}"][e], leaves[f"experts.{up}_bias"][e])
        a = F.silu(h[:, :24]) * h[:, 24:] if gated else F.gelu(h)
        out = F.linear(a, leaves["experts.down_proj"][e], leaves["experts.down_proj_bias"][e])
        y = y.index_add(0, rows, out * probs[rows, e : e + 1])
    (y.view_as(x) * weight).sum().backward()
    xo = x.clone().requires_grad_(True)
    yo = _run_layer(layer, xo)
    (yo * weight).sum().backward()
    res = {"y": (y.view_as(x).detach(), yo.detach()), "dx": (xr.grad, xo.grad)}
    for n, p in layer.named_parameters():
        res[n] = (leaves[n].grad, p.grad)
    assert isinstance(ex, HexaMoEMegatronExperts)
    return res


def _assert_pairs(res):
    for name, (ref, ours) in res.items():
        assert ref is not None and ours is not None, name
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=name)


def _vs_hf_mixtral(rank, world):
    """A whole HF Mixtral MoE block against megatron's layer holding HexaMoE experts with converted weights.

    (Expert parallelism > 1 cannot run here: megatron's all-gather dispatcher allocates on CUDA.)"""
    from megatron.core.transformer.spec_utils import build_module

    model = _tiny_mixtral(num_layers=1)
    block = model.model.layers[0].mlp
    torch.manual_seed(1)
    x_all = torch.randn(1, 5, 2, 16)
    with torch.no_grad():
        ref = block(x_all[rank].transpose(0, 1).contiguous()).transpose(0, 1)  # HF takes [batch, seq, d]
    layer = build_module(hexamoe_moe_spec(4), config=_megatron_config(gated=True, bias=False))
    mg = convert_hf_mixtral_experts(model.state_dict())
    layer.load_state_dict({k.removeprefix("decoder.layers.0.mlp."): v for k, v in mg.items()}, strict=True)
    x = x_all[rank].clone().requires_grad_(True)
    y = _run_layer(layer, x)
    y.sum().backward()
    return {"y": y.detach(), "ref": ref, "grad_norm": layer.experts.gate_up_proj.grad.norm().item()}


def _all_checks(rank, world):
    # one process (megatron's parallel state is global, and importing it costs ~10 s per process)
    _init_megatron(1)
    return {
        "sequential": _vs_sequential(rank, world),
        "naive_plain": _vs_naive(rank, world, gated=False),
        "naive_gated": _vs_naive(rank, world, gated=True),
        "hf_mixtral": _vs_hf_mixtral(rank, world),
        "spec": _spec_checks(rank, world),
    }


@pytest.fixture(scope="module")
def megatron_results():
    return run_distributed(_all_checks, 1, timeout=240)[0]


def test_experts_match_megatron_sequential_mlp(megatron_results):
    _assert_pairs(megatron_results["sequential"])


@pytest.mark.parametrize("case", ["naive_plain", "naive_gated"])
def test_experts_with_bias_match_naive_loop(megatron_results, case):
    res = megatron_results[case]
    assert {"experts.down_proj_bias", "router.weight", "dx"} <= res.keys()
    _assert_pairs(res)


def test_megatron_layer_matches_hf_mixtral_block(megatron_results):
    res = megatron_results["hf_mixtral"]
    torch.testing.assert_close(res["y"], res["ref"], rtol=1e-5, atol=1e-6)
    assert res["grad_norm"] > 0


def _spec_checks(rank, world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = use_hexamoe_experts(get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False))
    assert spec.submodules.mlp.submodules.experts.module is HexaMoEMegatronExperts
    errors = {}
    import torch.nn.functional as F

    bad = _megatron_config(True, False)
    bad.activation_func = F.relu6
    for name, cfg in {"activation_func": bad}.items():
        try:
            build_module(hexamoe_moe_spec(4), config=cfg)
        except ValueError as e:
            errors[name] = str(e)
    try:
        use_hexamoe_experts(get_gpt_layer_local_spec())
    except ValueError as e:
        errors["spec"] = str(e)
    layer = build_module(hexamoe_moe_spec(4), config=_megatron_config(True, False))
    sh = layer.experts.sharded_state_dict(prefix="decoder.layers.0.mlp.experts.")
    shapes = {k: tuple(v.global_shape) for k, v in sh.items()}
    # an empty batch still gives every expert parameter a (zero) gradient
    y, _ = layer.experts(torch.zeros(0, 16, requires_grad=True), torch.zeros(4, dtype=torch.long), torch.zeros(0))
    y.sum().backward()
    zero_grads = all(p.grad is not None and p.grad.abs().max() == 0 for p in layer.experts.parameters())
    return errors, shapes, zero_grads


def test_spec_rewrite_errors_and_checkpoint_metadata(megatron_results):
    errors, shapes, zero_grads = megatron_results["spec"]
    assert "activation_func" in errors["activation_func"] and "silu" in errors["activation_func"]
    assert "no MoESubmodules" in errors["spec"]
    assert shapes["decoder.layers.0.mlp.experts.gate_up_proj"] == (4, 48, 16)
    assert shapes["decoder.layers.0.mlp.experts.down_proj"] == (4, 16, 24)
    assert zero_grads


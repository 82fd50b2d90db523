"""Tiny random transformers MoE models, and the eager-vs-hexamoe equivalence check on them.

Every model whose modeling module uses ``@use_experts_implementation`` is discovered from the
installed transformers (no hard-coded list), given a tiny config (hidden 32, 2 layers, 4 experts,
top-2, vocab 64), saved with ``save_pretrained`` and loaded back twice from disk: once with
``experts_implementation="eager"`` (transformers' own per-expert loop, the reference) and once with
``"hexamoe"``. Logits and every parameter gradient are compared.

Shared by ``tests/test_transformers_backend.py`` and ``scripts/gen_supported_models.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import re
import tempfile
from functools import cache

import torch

import ds_hexamoe  # noqa: F401  (registers "hexamoe")

HIDDEN, LAYERS, EXPERTS, TOP_K, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 4, 2, 64, 4, 2, 8
REL_TOL = 1e-5  # fp32: max |hexamoe - eager| / max |eager|, per tensor
FP64_TOL = 1e-10  # where fp32 rounding alone exceeds REL_TOL, fp64 must agree to this
FP32_LOOSE = 1e-4  # ... and fp32 to this
ALWAYS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # must pass; never skipped

# Config fields shrunk when a config class has them. Names differ between model families, so the
# union is listed; fields a class lacks are ignored.
TINY_OVERRIDES: dict[str, object] = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "intermediate_size": 48, "moe_intermediate_size": 16, "moe_hidden_size": 16,
    "shared_expert_intermediate_size": 24, "shared_intermediate_size": 24,
    "shared_experts_intermediate_size": 24, "moe_shared_expert_intermediate_size": 24,
    "dense_intermediate_size": 48,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_k": TOP_K, "top_k": TOP_K,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "first_k_dense_replace": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "moe_layer_start_index": 0, "moe_layer_end_index": LAYERS - 1, "moe_layer_interval": 1,
    "moe_layer_freq": 1, "num_dense_layers": 0, "first_dense_layers": 0,
    "max_position_embeddings": 128, "sliding_window": 16, "sliding_window_size": 16,
    "max_window_layers": LAYERS,
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM, "qk_head_dim": 2 * HEAD_DIM, "v_head_dim": HEAD_DIM, "enable_moe_block": True,
    "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8,
    "linear_num_heads": 2, "linear_head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2,
    "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_chunk_size": 8, "mamba_dt_rank": 4,
    "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 8, "chunk_size": 8, "n_groups": 1,
    "mamba_n_groups": 1, "mamba_expand": 2,
    "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS, "swa_head_dim": HEAD_DIM,
    "router_hidden_size": 16, "rotary_dim": 4, "block_size": 8,
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB,
    "initializer_range": 0.1,  # larger than real inits, so differences are not hidden by tiny values
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "dropout": 0.0, "resid_pdrop": 0.0,
    "embd_pdrop": 0.0, "router_jitter_noise": 0.0, "input_jitter_noise": 0.0,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "use_cache": False,
}
# Families whose configs validate a choice the generic overrides break.
MODEL_OVERRIDES: dict[str, dict] = {
    "zaya": {"num_experts_per_tok": 1},  # "ZAYA currently supports num_experts_per_tok=1 only"
    # MLA with grouped KV heads: its rope width must stay half the head
    "mistral4": {"qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "qk_head_dim": 8, "num_key_value_heads": KV_HEADS},
}


@dataclasses.dataclass
class Result:
    """One model's outcome: ``status`` is ``pass``, ``fail`` or ``not tested``."""

    model_type: str
    cls_name: str = ""
    status: str = "not tested"
    logit_diff: float | None = None  # max |hexamoe - eager| / max |eager| over logits (or hidden states)
    grad_diff: float | None = None  # worst per-parameter max |dW_hexamoe - dW_eager| / max |dW_eager|
    skewed_logit_diff: float | None = None
    skewed_grad_diff: float | None = None
    fp64_diff: float | None = None  # set only when the fp32 difference needed an fp64 confirmation
    reason: str = ""

    @property
    def worst(self) -> float:
        vals = [v for v in (self.logit_diff, self.grad_diff, self.skewed_logit_diff, self.skewed_grad_diff) if v is not None]
        return max(vals) if vals else float("nan")


# ---------------------------------------------------------------- discovery
@cache
def discover() -> tuple[str, ...]:
    """Model types (``transformers.models.<name>``) whose modeling module uses ``@use_experts_implementation``."""
    import transformers.models as tm

    root = os.path.dirname(tm.__file__)
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, f"modeling_{name}.py")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                if "@use_experts_implementation" in fh.read():
                    found.append(name)
    return tuple(found)


def candidate_classes(model_type: str) -> list[type]:
    """Model classes to try, best first: ``*ForCausalLM``, then a text-only base model, then ``*Model``."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    own = [c for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == mod.__name__ and hasattr(c, "config_class")]
    causal = [c for c in own if c.__name__.endswith("ForCausalLM")]
    text = [c for c in own if c.__name__.endswith("TextModel")]
    base = [c for c in own if c.__name__.endswith("Model") and not c.__name__.endswith(("PreTrainedModel", "TextModel"))
            and not re.search(r"(Vision|Audio|Talker|Code2Wav|Encoder|Resampler)", c.__name__)]
    return causal + text + base


# ---------------------------------------------------------------- tiny configs
def _shrink_list(value: list, n: int) -> list:
    # the last layers of real configs are the MoE ones (dense layers come first)
    return list(value[-n:])


def tiny_config(config_cls: type, **overrides):
    """A tiny instance of ``config_cls``: every known size field shrunk, per-layer lists cut to 2 layers.

    ``overrides`` (e.g. ``num_experts_per_tok=1``) are applied last, to fields the class has.
    """
    defaults = config_cls().to_dict()
    kw = {k: v for k, v in TINY_OVERRIDES.items() if k in defaults}
    n_layers = defaults.get("num_hidden_layers")
    for key, value in defaults.items():
        if isinstance(value, list) and n_layers and len(value) == n_layers:
            kw[key] = _shrink_list(value, LAYERS)
    if "intermediate_size" in kw and "moe_intermediate_size" not in defaults and "moe_hidden_size" not in defaults:
        kw["intermediate_size"] = 16  # the experts use intermediate_size (Mixtral, OLMoE)
    if "kv_lora_rank" in defaults:  # multi-head latent attention has no grouped KV heads
        kw["num_key_value_heads"] = HEADS
    if "top_k_experts" in defaults:
        kw["top_k_experts"] = TOP_K
    for key, value in overrides.items():
        if key in defaults:
            kw[key] = value
    for key, value in list(kw.items()):  # per-modality lists ([text, vision] sizes) take the size for each entry
        if isinstance(defaults[key], list) and isinstance(value, int):
            kw[key] = [value] * len(defaults[key])
    return config_cls(**kw)


def _sub_text_config(config):
    return getattr(config, "text_config", None) or config


# ---------------------------------------------------------------- building and comparing
MAX_PARAMS = 2_000_000  # a "tiny" model above this kept an unshrunk part (a vision tower, ...)


def build_tiny(cls: type, path: str, seed: int = 0, **overrides) -> None:
    """Random tiny ``cls`` saved with ``save_pretrained`` into ``path``."""
    config = tiny_config(cls.config_class, **overrides)
    with torch.device("meta"):  # size check before any real allocation
        n_params = sum(p.numel() for p in cls(config).parameters())
    if n_params > MAX_PARAMS:
        raise RuntimeError(f"tiny config still has {n_params / 1e6:.0f}M parameters (an unshrunk sub-model)")
    torch.manual_seed(seed)
    model = cls(config)
    if not any(_is_experts(m) for m in model.modules()):
        raise RuntimeError("tiny config has no @use_experts_implementation experts module")
    model.save_pretrained(path)


def _is_experts(m: torch.nn.Module) -> bool:
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed")


def load(cls: type, path: str, impl: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with contextlib.redirect_stderr(io.StringIO()):
        model = cls.from_pretrained(path, experts_implementation=impl, dtype=dtype)
    model.eval()  # no dropout / jitter; gradients are still taken
    got = {getattr(m.config, "_experts_implementation", None) for m in model.modules() if _is_experts(m)}
    if got != {impl}:
        raise RuntimeError(f"experts modules report implementation {got}, expected {impl!r}")
    return model


def skew_routing(model: torch.nn.Module) -> int:
    """Zero every router weight so all experts tie and every token picks the same ``k``: the rest get none.

    Router parameters are found next to each experts module: ``[E, hidden]`` matrices and ``[E]``
    vectors of the MoE block that are not expert weights. Returns how many tensors were zeroed.
    """
    n = 0
    for block in model.modules():
        experts = [c for c in block.children() if _is_experts(c)]
        if not experts:
            continue
        num_e = getattr(experts[0], "num_experts", None) or _expert_count(experts[0])
        expert_params = {id(p) for p in experts[0].parameters()}
        with torch.no_grad():
            for t in list(block.parameters()) + list(block.buffers()):
                if id(t) in expert_params or not t.is_floating_point() or t.dim() not in (1, 2) or t.size(0) != num_e:
                    continue
                t.zero_()
                n += 1
    return n


def _expert_count(experts: torch.nn.Module) -> int:
    return (experts.gate_up_proj if experts.has_gate else experts.up_proj).size(0)


def is_hexamoe_node(name: str) -> bool:
    """An autograd node of the ``hexamoe::expert_mlp`` / ``hexamoe::expert_linear`` ops."""
    return "hexamoe_expert_" in name


def autograd_ops(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes reachable from ``t``: proves which experts path actually ran."""
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def forward_backward(model: torch.nn.Module, input_ids: torch.Tensor, probe: torch.Tensor | None):
    """Output tensor, the autograd node names, and every parameter gradient for loss ``<out, probe>``."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if probe is None:
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * probe).sum().backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    return y.detach(), autograd_ops(y), grads, probe


def rel_diff(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    denom = max(float(b.abs().max()), floor)
    err = float((a - b).abs().max())
    return 0.0 if err == 0 else (err / denom if denom > 0 else float("inf"))


def compare_models(ref: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor):
    """``(logit_diff, grad_diff)`` of ``ours`` (hexamoe) against ``ref`` (eager); raises on a structural mismatch."""
    y_ref, ops_ref, g_ref, probe = forward_backward(ref, ids, None)
    y_our, ops_our, g_our, _ = forward_backward(ours, ids, probe)
    if not any(is_hexamoe_node(n) for n in ops_our):
        raise RuntimeError("hexamoe autograd functions not in the graph: the backend did not run")
    if any(is_hexamoe_node(n) for n in ops_ref):
        raise RuntimeError("eager reference ran through hexamoe")
    if not torch.isfinite(y_ref).all():
        raise RuntimeError("eager reference produced non-finite outputs")
    if g_ref.keys() != g_our.keys() or any((g_ref[n] is None) != (g_our[n] is None) for n in g_ref):
        raise RuntimeError("different sets of parameters received gradients")
    live = [g for g in g_ref.values() if g is not None]
    floor = 1e-3 * max(float(g.abs().max()) for g in live)  # a near-zero gradient is judged on the model's scale
    grad_diff = max(rel_diff(g_our[n], g_ref[n], floor) for n in g_ref if g_ref[n] is not None)
    return rel_diff(y_our, y_ref), grad_diff


def input_ids(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> torch.Tensor:
    vocab = _sub_text_config(model.config).vocab_size
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))


def compare(cls: type, path: str, *, skewed: bool = False):
    """Load ``path`` as eager and hexamoe and compare: ``(logit_diff, grad_diff, tokens per expert per layer)``."""
    ref, ours = load(cls, path, "eager"), load(cls, path, "hexamoe")
    if skewed and (skew_routing(ref) == 0 or skew_routing(ours) == 0):
        raise RuntimeError("no router weights found to skew")
    ids = input_ids(ours)
    counts = _routing_counts(ours, ids)
    return (*compare_models(ref, ours, ids), counts)


def _routing_counts(model: torch.nn.Module, ids: torch.Tensor) -> list[list[int]]:
    """Tokens per expert in each experts module for ``ids`` (recorded by forward pre-hooks)."""
    counts, hooks = [], []

    def hook(mod, args, kwargs):
        top = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if top is not None:
            n = getattr(mod, "num_experts", None) or _expert_count(mod)
            counts.append(torch.bincount(top.reshape(-1).clamp(max=n), minlength=n + 1)[:n].tolist())

    for m in model.modules():
        if _is_experts(m):
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
    msg = lines[0] if len(lines) == 1 or not lines[0].endswith(":") else f"{lines[0]} {lines[1]}"
    return msg[:200]


def _judge(cls: type, path: str, ref: torch.nn.Module, ids: torch.Tensor, skewed: bool, dtype: torch.dtype):
    """Diffs ``(natural logit, natural grad, skewed logit, skewed grad)``; skewed ones ``None`` without a router."""
    if ref.dtype != dtype:
        ref = load(cls, path, "eager", dtype)
    ours = load(cls, path, "hexamoe", dtype)
    diffs = list(compare_models(ref, ours, ids))
    if skewed and skew_routing(ref) and skew_routing(ours):
        diffs += compare_models(ref, ours, ids)
    else:
        diffs += [None, None]
    return diffs


def check_model(model_type: str, workdir: str | None = None, skewed: bool = True) -> Result:
    """Try each candidate class of ``model_type``; the first that builds and runs under eager is judged.

    Judged means: natural routing, then (``skewed``) the same two models with zeroed routers, where
    every token picks the same ``k`` experts and the others get no tokens. Pass: every fp32 difference
    <= ``REL_TOL``; or, when fp32 rounding alone is larger (deep products of big activations), fp32
    <= ``FP32_LOOSE`` and the same comparison in fp64 <= ``FP64_TOL``.
    """
    res = Result(model_type)
    try:
        classes = candidate_classes(model_type)
    except Exception as exc:  # an optional dependency missing for the modeling module
        res.reason = f"import failed: {_short(exc)}"
        return res
    if not classes:
        res.reason = "no causal-LM or text model class"
        return res
    reasons = []
    for cls in classes:
        with tempfile.TemporaryDirectory(prefix=f"tiny-{model_type}-", dir=workdir) as path:
            try:
                build_tiny(cls, path, **MODEL_OVERRIDES.get(model_type, {}))
                ref = load(cls, path, "eager")
                ids = input_ids(ref)
                forward_backward(ref, ids, None)
            except Exception as exc:
                reasons.append(f"{cls.__name__}: {_short(exc)}")
                continue
            res.cls_name = cls.__name__
            try:
                res.logit_diff, res.grad_diff, res.skewed_logit_diff, res.skewed_grad_diff = _judge(
                    cls, path, ref, ids, skewed, torch.float32)
                if res.worst > REL_TOL and res.worst <= FP32_LOOSE:
                    res.fp64_diff = max(v for v in _judge(cls, path, ref, ids, skewed, torch.float64) if v is not None)
            except Exception as exc:
                res.status, res.reason = "fail", _short(exc)
                return res
            notes = []
            if skewed and res.skewed_grad_diff is None:
                notes.append("router not found: natural routing only")
            ok = res.worst <= REL_TOL or (res.fp64_diff is not None and res.fp64_diff <= FP64_TOL)
            if res.fp64_diff is not None:
                notes.append(f"fp32 diff {res.worst:.1e} is rounding: fp64 diff {res.fp64_diff:.0e}")
            elif not ok:
                notes.append(f"difference {res.worst:.2e} > {REL_TOL:.0e}")
            res.status = "pass" if ok else "fail"
            res.reason = "; ".join(notes)
            return res
    res.reason = "; ".join(reasons)[:400]
    return res

"""The ``"hexamoe"`` experts implementation for transformers v5's ``@use_experts_implementation`` models.

``import ds_hexamoe`` registers it, so ``from_pretrained(path, experts_implementation="hexamoe")`` runs
every expert matmul through ESMM/ESTMM/ESS. Where an experts module is managed by FSSDP, its weights
come from the module's ``_hexamoe_weights`` provider (materialized shards) instead of its parameters.
"""
from __future__ import annotations

import torch

from ..ops import build_expert_index, expert_linear, expert_mlp
from ..ops.activations import activation_name

IMPLEMENTATION = "hexamoe"


# Flags set by @use_experts_implementation; older transformers v5 releases lack some (e.g. 5.17 has no
# has_post_expert_norm), so read them with transformers' own defaults.
_FLAG_DEFAULTS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                  "has_post_expert_norm": False}


def _flag(module, name: str) -> bool:
    return getattr(module, name, _FLAG_DEFAULTS[name])


def _stats_collector():
    """The active routing-statistics collector, if the placement package is present and one is set."""
    try:
        from ..placement.stats import get_collector
    except ImportError:
        return None
    return get_collector()


def _default_gate(module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    return getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate


def expert_weights(module, index=None) -> dict[str, torch.Tensor | None]:
    """The experts' 3-D weights in ``[E, in, out]`` orientation (views, no copies).

    An FSSDP-managed module supplies materialized weights through ``module._hexamoe_weights(index)``.
    """
    provider = getattr(module, "_hexamoe_weights", None)
    if provider is not None:
        raw = provider(index)
    else:
        up = "gate_up_proj" if _flag(module, "has_gate") else "up_proj"
        raw = {
            "w1": getattr(module, up),
            "w2": module.down_proj,
            "b1": getattr(module, f"{up}_bias", None) if _flag(module, "has_bias") else None,
            "b2": getattr(module, "down_proj_bias", None) if _flag(module, "has_bias") else None,
        }
    if not _flag(module, "is_transposed"):  # transformers stores [E, out, in]
        raw = dict(raw, w1=raw["w1"].transpose(1, 2), w2=raw["w2"].transpose(1, 2))
    return raw


def hexamoe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Dropless experts forward on the expert-specific operators; a drop-in for ``grouped_mm``."""
    w = None
    num_experts = getattr(self, "num_experts", None)
    if num_experts is None:
        w = expert_weights(self)
        num_experts = w["w1"].size(0)
    index = build_expert_index(top_k_index, num_experts)
    self._hexamoe_last_counts = index.counts
    collector = _stats_collector()
    if collector is not None:
        # unnamed modules (no ds_hexamoe.initialize) stay distinct per instance
        name = getattr(self, "_hexamoe_name", None) or f"{type(self).__name__}@{id(self):x}"
        collector.record(name, top_k_index, num_experts)
    if w is None:
        w = expert_weights(self, index)
    row_scale = top_k_weights.reshape(-1)
    if getattr(self, "_is_expert_parallel", False):
        row_scale = row_scale.masked_fill(top_k_index.reshape(-1) >= num_experts, 0.0)
    act = activation_name(self.act_fn) if hasattr(self, "act_fn") else None
    gated, post_norm = _flag(self, "has_gate"), _flag(self, "has_post_expert_norm")
    simple = act is not None and not post_norm and (not gated or _default_gate(self))
    if simple:
        out = expert_mlp(
            hidden_states, w["w1"], w["w2"], index, act=act, gated=gated,
            interleaved=not _flag(self, "is_concatenated"), b1=w["b1"], b2=w["b2"], row_scale=row_scale,
        )
        return out.to(hidden_states.dtype)
    # A model-specific gate (clamped SwiGLU, ...) or a post-expert norm: the two expert linears still
    # run on the operators; the element-wise part in between is differentiated by autograd.
    h = expert_linear(hidden_states, w["w1"], index, gather_div=index.k, bias=w["b1"])
    a = self._apply_gate(h) if gated else self.act_fn(h)
    if post_norm:
        y = expert_linear(a, w["w2"], index, scatter=True, bias=w["b2"])
        y = self.post_expert_norm(y) * row_scale.unsqueeze(-1).to(y.dtype)
    else:
        y = expert_linear(a, w["w2"], index, scatter=True, bias=w["b2"], row_scale=row_scale)
    k = index.k
    return y.view(-1, k, y.size(-1)).sum(1, dtype=torch.float32).to(hidden_states.dtype)


def _register_into(moe_module) -> None:
    moe_module.ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hexamoe_experts_forward)


def register() -> None:
    """Register ``"hexamoe"`` in transformers' experts interface as soon as transformers loads it."""
    from .._import_hooks import when_imported

    when_imported("transformers.integrations.moe", _register_into)


def uses_experts_interface(model: torch.nn.Module) -> bool:
    """True when some submodule is a ``@use_experts_implementation`` experts class."""
    return any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in model.modules())


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every transformers experts module in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]

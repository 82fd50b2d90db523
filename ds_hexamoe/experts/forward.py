"""The ``"hexamoe"`` experts forward: every expert matmul of a module through ESMM/ESTMM/ESS.

A drop-in for transformers' ``grouped_mm`` experts function (same arguments, same result as ``eager``),
used by transformers models after registration and by :class:`ds_hexamoe.layers.HexaExperts`.
"""
from __future__ import annotations

import torch

from ..ops import build_expert_index, expert_mlp
from ..ops.activations import activation_name
from .lora import active_lora, lora_linear, lora_mlp
from .protocol import default_gate, expert_weights, flag, state_of


def record_routing(module: torch.nn.Module, top_k_index: torch.Tensor, num_experts: int,
                   counts: torch.Tensor | None = None, fallback_name: str | None = None) -> None:
    """Note one call's routing on the module: ``last_counts`` (tokens per expert; from ``top_k_index`` unless
    given) and the routing-statistics collector, if one is attached. Every experts forward calls this."""
    state = state_of(module)
    if counts is None:
        flat = top_k_index.reshape(-1).to(torch.int64).clamp(0, num_experts)  # sentinel ids land past the end
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    state.last_counts = counts
    if state.collector is not None:
        # unnamed modules (no ds_hexamoe.initialize) stay distinct per instance
        name = state.name or fallback_name or f"{type(module).__name__}@{id(module):x}"
        state.collector.record(name, top_k_index, num_experts)


def _gate(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The module's own gate, or the default ``act(gate) * up`` for modules without one (``HexaExperts``)."""
    apply = getattr(module, "_apply_gate", None)
    if apply is not None:
        return apply(h)
    g, u = h.chunk(2, dim=-1) if flag(module, "is_concatenated") else (h[:, 0::2], h[:, 1::2])
    return module.act_fn(g) * u


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
    record_routing(self, top_k_index, num_experts, counts=index.counts)
    if w is None:
        w = expert_weights(self, index)
    row_scale = top_k_weights.reshape(-1)
    if getattr(self, "_is_expert_parallel", False):  # transformers' own expert parallelism
        row_scale = row_scale.masked_fill(top_k_index.reshape(-1) >= num_experts, 0.0)
    act = activation_name(self.act_fn) if hasattr(self, "act_fn") else None
    gated, post_norm = flag(self, "has_gate"), flag(self, "has_post_expert_norm")
    lora = active_lora(self, w)
    simple = act is not None and not post_norm and (not gated or default_gate(self)) and not lora
    if simple:
        out = expert_mlp(
            hidden_states, w["w1"], w["w2"], index, act=act, gated=gated,
            interleaved=not flag(self, "is_concatenated"), b1=w["b1"], b2=w["b2"], row_scale=row_scale,
        )
        return out.to(hidden_states.dtype)
    # A model-specific gate (clamped SwiGLU, ...), a post-expert norm or LoRA adapters: the expert linears
    # still run on the operators; the element-wise part in between is differentiated by autograd.
    def activate(h):
        return _gate(self, h) if gated else self.act_fn(h)

    if not post_norm:
        return lora_mlp(hidden_states, w["w1"], w["w2"], index, lora, activate, b1=w["b1"], b2=w["b2"],
                        row_scale=row_scale)
    h = lora_linear(hidden_states, w["w1"], index, lora.get("w1"), gather_div=index.k, bias=w["b1"])
    y = lora_linear(activate(h), w["w2"], index, lora.get("w2"), scatter=True, bias=w["b2"])
    y = self.post_expert_norm(y) * row_scale.unsqueeze(-1).to(y.dtype)
    k = index.k
    return y.view(-1, k, y.size(-1)).sum(1, dtype=torch.float32).to(hidden_states.dtype)

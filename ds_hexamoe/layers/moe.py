"""Dropless experts and the MoE block, with weights in transformers v5's 3-D layout.

:class:`HexaExperts` exposes the same attributes as a transformers ``@use_experts_implementation``
experts class (``has_gate``, ``has_bias``, ``is_transposed``, ...), so FSSDP, the kernels and the
statistics treat it exactly like a Mixtral or Qwen experts module.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..config import RouterConfig
from ..experts import hexamoe_experts_forward
from .router import TopKRouter


class HexaExperts(nn.Module):
    """``E`` experts: gated ``(act(x W_g) * x W_u) W_d`` or plain ``act(x W_1 + b_1) W_2 + b_2``.

    Parameters: ``gate_up_proj [E, 2f, d]`` (gated) or ``up_proj [E, f, d]``, ``down_proj [E, d, f]``,
    and ``*_bias`` when ``bias``.
    """

    is_transposed = False
    is_concatenated = True
    has_post_expert_norm = False

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, act: str = "silu", gated: bool = True, bias: bool = False):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, ffn_size
        self.has_gate, self.has_bias = gated, bias
        self._is_expert_parallel = False  # transformers' flag: its own expert parallelism is never on here
        self.act_fn = ACT2FN[act]
        up = "gate_up_proj" if gated else "up_proj"
        f_out = 2 * ffn_size if gated else ffn_size
        setattr(self, up, nn.Parameter(torch.empty(num_experts, f_out, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))
        if bias:
            setattr(self, f"{up}_bias", nn.Parameter(torch.zeros(num_experts, f_out)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.size(-1)))

    def forward(self, hidden_TD: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return hexamoe_experts_forward(self, hidden_TD, top_k_index, top_k_weights)


class MoEBlock(nn.Module):
    """Router + dropless experts (+ an optional always-on shared expert), ``[..., d] -> [..., d]``.

    After each forward, ``aux_loss`` holds the router's scaled auxiliary + z losses and ``counts`` the
    tokens per expert.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        router: RouterConfig | None = None,
        act: str = "silu",
        gated: bool = True,
        bias: bool = False,
        shared_ffn_size: int = 0,
    ):
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, router)
        self.experts = HexaExperts(num_experts, hidden_size, ffn_size, act=act, gated=gated, bias=bias)
        self.shared_expert = None
        if shared_ffn_size > 0:
            self.shared_expert = nn.Sequential(
                nn.Linear(hidden_size, shared_ffn_size, bias=bias), ACT2FN[act], nn.Linear(shared_ffn_size, hidden_size, bias=bias)
            )
        self.aux_loss: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        r = self.router(x_TD)
        y_TD = self.experts(x_TD, r.top_k_index, r.top_k_weights.to(x.dtype))
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        self.aux_loss = r.aux_loss + r.z_loss
        self.counts = r.counts
        return y_TD.reshape(shape)


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the last forward's auxiliary losses over every :class:`MoEBlock` in ``model``."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoEBlock) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None

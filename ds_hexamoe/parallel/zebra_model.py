"""The MoE stack the zebra pipeline runs, cut at the places where tokens leave attention ranks.

A pre-norm block ``h = z + attn(ln1(z)); x = ln2(h); y = experts(x); z' = h + y`` is cut into an
*attention segment* (everything but the experts: residual, causal attention, router) and an *expert
segment* (the dropless expert MLP of the pairs a rank hosts). The last segment is the output head and
the loss. Every segment is a plain function of detached inputs, so a pipeline can run forward and
backward of each (layer, micro-batch) on its own and in any order (docs/modes.md, "Zebra").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .local_experts import compute_experts, expert_region
from .weights import ExpertSpec, ExpertWeights


@dataclass(frozen=True)
class ZebraModelConfig:
    """Shape of the stack: ``layers`` blocks of model dim ``d``, ``experts`` gated SiLU experts of size ``ffn``."""

    layers: int = 2
    d: int = 32
    heads: int = 4
    seq: int = 16
    experts: int = 4
    ffn: int = 48
    top_k: int = 2

    def __post_init__(self):
        for name in ("layers", "d", "heads", "seq", "experts", "ffn", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"zebra.model.{name}: got {v!r}; expected an integer >= 1")
        if self.d % self.heads:
            raise ValueError(f"zebra.model.heads: {self.heads} does not divide d = {self.d}; pick a divisor of d")
        if self.top_k > self.experts:
            raise ValueError(f"zebra.model.top_k: got {self.top_k} > experts = {self.experts}; expected top_k <= experts")

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.experts, self.ffn, act="silu", gated=True)


class DenseLayer(nn.Module):
    """Attention half of one block plus its router."""

    def __init__(self, c: ZebraModelConfig):
        super().__init__()
        self.c = c
        self.ln1, self.ln2 = nn.LayerNorm(c.d), nn.LayerNorm(c.d)
        self.qkv, self.proj = nn.Linear(c.d, 3 * c.d), nn.Linear(c.d, c.d)
        self.router = nn.Linear(c.d, c.experts, bias=False)

    def forward(self, z: torch.Tensor):
        """``z [B, S, d]`` -> ``h [B, S, d]``, normalized rows ``x [B*S, d]``, ``top_k_index``, ``top_k_weights``."""
        b, s, d = z.shape
        q, k, v = self.qkv(self.ln1(z)).view(b, s, 3, self.c.heads, d // self.c.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        h = z + self.proj(a)
        x = self.ln2(h).reshape(b * s, d)
        top_w, top_i = torch.topk(self.router(x).softmax(-1), self.c.top_k, dim=-1)
        return h, x, top_i, top_w / top_w.sum(-1, keepdim=True)


class ZebraModel(nn.Module):
    """Dense part (``dense``: blocks' attention and routers, the head) and experts (``w1 [L, E, d, 2f]``,
    ``w2 [L, E, f, d]``), kept apart because disaggregation places them on different ranks."""

    def __init__(self, c: ZebraModelConfig, seed: int = 0):
        super().__init__()
        self.c = c
        g = torch.Generator().manual_seed(seed)
        self.dense = nn.ModuleDict({"blocks": nn.ModuleList(DenseLayer(c) for _ in range(c.layers)), "head": nn.Linear(c.d, c.d)})
        for p in self.dense.parameters():  # deterministic across processes, independent of torch's global RNG
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
        self.w1 = nn.Parameter(torch.randn(c.layers, c.experts, c.d, 2 * c.ffn, generator=g) / math.sqrt(c.d))
        self.w2 = nn.Parameter(torch.randn(c.layers, c.experts, c.ffn, c.d, generator=g) / math.sqrt(c.ffn))

    @property
    def spec(self) -> ExpertSpec:
        return self.c.spec

    def dense_parameters(self):
        """What the attention ranks hold and step: blocks' attention and routers, the head."""
        return list(self.dense.parameters())

    def expert_parameters(self):
        return [self.w1, self.w2]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs  # the stack takes vectors, not token ids

    def loss_count(self, target: torch.Tensor) -> int:
        """Elements of ``target`` in the loss's mean."""
        return target.numel()

    def experts_of(self, layer: int, hosted: list[int]) -> ExpertWeights:
        """Differentiable weights of the ``hosted`` experts of ``layer``."""
        ids = torch.as_tensor(hosted, dtype=torch.int64)
        return ExpertWeights(self.w1[layer].index_select(0, ids), self.w2[layer].index_select(0, ids))

    def attention_segment(self, layer: int, z: torch.Tensor):
        return self.dense["blocks"][layer](z)

    def expert_segment(self, layer: int, hosted: list[int], x, local_idx, w, weights: ExpertWeights | None = None) -> torch.Tensor:
        """Sum over a row's pairs hosted here (``local_idx < len(hosted)``) of ``w * expert(x)``; ``weights``:
        the hosted experts already materialized (default: taken from the parameters now)."""
        with expert_region():  # taking the experts out of the parameters is expert-layer work too
            weights = self.experts_of(layer, hosted) if weights is None else weights
            return compute_experts(x, local_idx, w, weights, self.c.spec)

    def head_loss(self, z: torch.Tensor, target: torch.Tensor, denom: int) -> torch.Tensor:
        """Summed squared error over ``denom``: a share of the global mean, so shares add up exactly."""
        return (self.dense["head"](z) - target).pow(2).sum() / denom

    def reference_loss(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The whole stack in one process with every expert local: the exactness reference."""
        z = inputs
        every = list(range(self.c.experts))
        for l in range(self.c.layers):
            h, x, idx, w = self.attention_segment(l, z)
            z = h + self.expert_segment(l, every, x, idx, w).view_as(h)
        return self.head_loss(z, target, target.numel())


def make_batch(c: ZebraModelConfig, samples: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic regression batch ``(inputs, target)``, each ``[samples, seq, d]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, c.seq, c.d, generator=g)
    return x, torch.tanh(x.roll(1, dims=1)) + 0.1 * torch.randn(samples, c.seq, c.d, generator=g)

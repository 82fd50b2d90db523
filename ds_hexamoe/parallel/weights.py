"""Materialized expert weights: what a parallel MoE call computes with, and where it comes from.

A parallel call asks a :data:`Materialize` callable for the experts this rank hosts in this call
(expert parallel: a list of experts, whole; model centric: every expert, a slice ``[lo, hi)`` of the
hidden dimension ``f``). The callable returns an :class:`ExpertWeights` whose tensors are part of the
autograd graph, so weight gradients flow back to whatever produced them: slices of full replicated
parameters (:class:`ReplicatedExperts`, tests and the data-centric baseline) or FSSDP's
SparseAllGather output (whose backward reduces replica gradients to the shard owners).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..apportion import largest_remainder
from ..ops.activations import get_activation


@dataclass(frozen=True)
class ExpertSpec:
    """Shape and kind of one MoE layer's experts (the parts the parallel paths must know)."""

    num_experts: int
    ffn_dim: int  # f: the hidden size of one expert (F1 = 2f when gated)
    act: str = "silu"
    gated: bool = True
    interleaved: bool = False  # gated layout [g0, u0, g1, u1, ...] instead of [gate; up]

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"ExpertSpec.num_experts: got {self.num_experts!r}; expected an integer >= 1")
        if not isinstance(self.ffn_dim, int) or self.ffn_dim < 1:
            raise ValueError(f"ExpertSpec.ffn_dim: got {self.ffn_dim!r}; expected an integer >= 1 (the expert hidden size f)")
        get_activation(self.act)  # raises naming the allowed activations

    @property
    def f1(self) -> int:
        return 2 * self.ffn_dim if self.gated else self.ffn_dim

    def f1_columns(self, lo: int, hi: int, device: torch.device | None = None) -> torch.Tensor:
        """Columns of ``w1``'s last dimension that belong to hidden units ``[lo, hi)``."""
        r = torch.arange(lo, hi, device=device)
        if not self.gated:
            return r
        if self.interleaved:
            return torch.stack((2 * r, 2 * r + 1), 1).flatten()
        return torch.cat((r, r + self.ffn_dim))


@dataclass
class ExpertWeights:
    """Weights of ``n`` materialized experts (or of a hidden slice of every expert).

    ``w1 [n, d, F1]``, ``w2 [n, f, d]``, ``b1 [n, F1]``, ``b2 [n, d]`` (biases optional), the layout
    :func:`ds_hexamoe.ops.expert_mlp` takes.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    b1: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    # active LoRA adapters, {"w1"|"w2": ds_hexamoe.experts.lora.LoraFactors} indexed like w1/w2 (None: none)
    lora: dict | None = None

    def check(self, n: int, d: int, f1: int | None, f: int | None, who: str) -> None:
        """Raise naming the tensor when shapes differ from ``n`` experts of model dim ``d``."""
        exp = {"w1": (n, d, f1), "w2": (n, f, d), "b1": (n, f1), "b2": (n, d)}
        for name, shape in exp.items():
            t = getattr(self, name)
            if t is None:
                continue
            got = tuple(t.shape)
            if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
                want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"{who}: materialized {name} has shape {list(got)}; expected {want}")


# (experts to host, hidden slice [lo, hi) or None for whole experts) -> their weights.
# A callable with the attribute ``full_layer = True`` returns ``[E, ...]`` tensors for whole-expert
# requests instead (valid at the requested experts; others are never read): the expert-parallel layer
# then indexes them by expert id, so weights living in a full-layer buffer (FSSDP's cache) need no copy.
Materialize = Callable[[Sequence[int], "tuple[int, int] | None"], ExpertWeights]


class ReplicatedExperts:
    """A :data:`Materialize` over full weights present on every rank (differentiable slices of them).

    ``w1 [E, d, F1]``, ``w2 [E, f, d]``: pass transformers' ``gate_up_proj.transpose(1, 2)`` and
    ``down_proj.transpose(1, 2)``. Gradients land in the full tensors, nonzero only where this rank
    computed; the caller sums them over ranks (or FSSDP reduces them to owners).
    """

    def __init__(self, spec: ExpertSpec, w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None):
        self.spec, self.w1, self.w2, self.b1, self.b2 = spec, w1, w2, b1, b2
        ExpertWeights(w1, w2, b1, b2).check(spec.num_experts, w1.size(1), spec.f1, spec.ffn_dim, "ReplicatedExperts")

    def __call__(self, experts: Sequence[int], f_range: tuple[int, int] | None = None) -> ExpertWeights:
        experts = list(experts)
        if experts == list(range(self.spec.num_experts)):
            w1, w2, b1, b2 = self.w1, self.w2, self.b1, self.b2  # every expert: no copy
        else:
            ids = torch.as_tensor(experts, dtype=torch.int64, device=self.w1.device)
            w1, w2 = self.w1.index_select(0, ids), self.w2.index_select(0, ids)
            b1 = None if self.b1 is None else self.b1.index_select(0, ids)
            b2 = None if self.b2 is None else self.b2.index_select(0, ids)
        if f_range is not None:
            lo, hi = f_range
            cols = self.spec.f1_columns(lo, hi, w1.device)
            w1, w2 = w1.index_select(2, cols), w2[:, lo:hi]
            b1 = None if b1 is None else b1.index_select(1, cols)
        return ExpertWeights(w1, w2, b1, b2)


def split_hidden(f: int, speeds: Sequence[float]) -> list[int]:
    """Integers ``f_r`` proportional to ``speeds`` that sum to ``f`` (:func:`ds_hexamoe.apportion.largest_remainder`)."""
    return largest_remainder(f, speeds, what="speeds")

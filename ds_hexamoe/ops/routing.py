"""The re-index vector: sort the ``T*k`` (token, expert) pairs by expert once per layer.

Everything downstream (ESMM, ESTMM, ESS, FSSDP's active-expert sets, the load statistics) reads the
same :class:`ExpertIndex`, so it is built exactly once per MoE layer call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertIndex:
    """Expert-ordered view of the routing decisions.

    Attributes:
        idx: ``[P]`` int64, ``P = T*k``. Position ``p`` in expert order holds pair ``idx[p]``,
            i.e. token ``idx[p] // k``, choice ``idx[p] % k``.
        offs: ``[E+1]`` int64 segment bounds; expert ``e`` owns positions ``offs[e]:offs[e+1]``.
        counts: ``[E]`` int64 tokens per expert (``offs.diff()``).
        k: routing fan-out (top-k).
    """

    idx: torch.Tensor
    offs: torch.Tensor
    counts: torch.Tensor
    k: int

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def num_pairs(self) -> int:
        return self.idx.numel()

    def active_experts(self) -> torch.Tensor:
        """Ids of experts that received at least one token (int64, ascending)."""
        return torch.nonzero(self.counts > 0, as_tuple=False).flatten()


def segment_ids(offs: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Expert id of each of the first ``n_valid`` positions in expert order (``offs`` from an ExpertIndex)."""
    counts = offs.diff()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offs.device), counts, output_size=n_valid)


def build_expert_index(top_k_index: torch.Tensor, num_experts: int) -> ExpertIndex:
    """Sort ``top_k_index[T, k]`` by expert (stable, so pairs keep token order inside a segment).

    Entries ``>= num_experts`` (expert-parallel sentinels) are placed after the last segment and are
    never read by the operators. Every output shape follows from ``T``, ``k`` and ``num_experts`` alone
    and nothing syncs with the host, so ``torch.compile(fullgraph=True)`` traces it.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got shape {tuple(top_k_index.shape)}")
    k = top_k_index.size(1)
    flat = top_k_index.reshape(-1).to(torch.int64)
    if flat.numel() and not torch.compiler.is_compiling():
        # a negative id would sort before expert 0 and its pair would be dropped silently; the async assert
        # raises without a host sync (under torch.compile the router's top-k cannot produce one)
        torch._assert_async(flat.min() >= 0, "top_k_index holds a negative expert id; ids must be in [0, num_experts)")
    experts, idx = torch.sort(flat, stable=True)
    # offs[e] = #pairs routed below expert e: a fixed-size search, where bincount's size depends on the data
    offs = torch.searchsorted(experts, torch.arange(num_experts + 1, device=flat.device, dtype=torch.int64))
    counts = offs.diff()
    return ExpertIndex(idx=idx, offs=offs, counts=counts, k=k)

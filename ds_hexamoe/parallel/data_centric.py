"""Data-centric execution: every rank runs its own tokens through the experts it materializes.

The no-token-movement baseline (docs/design.md, "Execution modes"): all experts here; FSSDP materializes
only the active ones. Weight gradients are reduced by the caller (DDP all-reduce, or FSSDP's
SparseReduceScatter).
"""
from __future__ import annotations

import torch

from .accounting import TokenAccounting
from .local_experts import check_routing, compute_experts
from .weights import ExpertSpec, Materialize


class DataCentricMoE:
    """Local dropless experts on local tokens; no collective in the layer."""

    mode = "data_centric"

    def __init__(self, spec: ExpertSpec, *, accounting: TokenAccounting | None = None):
        self.spec = spec
        self.accounting = accounting if accounting is not None else TokenAccounting()

    def __call__(self, hidden, top_k_index, top_k_weights, materialize: Materialize, layer: int | None = None) -> torch.Tensor:
        spec = self.spec
        check_routing(hidden, top_k_index, top_k_weights, spec.num_experts)
        counts = torch.bincount(top_k_index.reshape(-1).to(torch.int64), minlength=spec.num_experts)
        stats = self.accounting.new_call(self.mode, layer, hidden.size(0), top_k_index.numel(), counts.tolist())
        stats.rows_computed = top_k_index.numel()
        weights = materialize(list(range(spec.num_experts)), None)
        weights.check(spec.num_experts, hidden.size(1), spec.f1, spec.ffn_dim, "materialize(all experts, None)")
        return compute_experts(hidden, top_k_index, top_k_weights, weights, spec)

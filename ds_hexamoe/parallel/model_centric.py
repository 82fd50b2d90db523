"""Model-centric MoE (HEXA-MoE): move tokens, not weights (docs/design.md, "Execution modes").

Tokens and routing of every rank are all-gathered (uneven counts allowed); each rank runs every
expert restricted to its slice ``[lo, hi)`` of the hidden dimension ``f`` (slice sizes proportional to
per-rank speeds); the partial outputs are summed and scattered back to the tokens' ranks by a
reduce-scatter. A gated MLP splits exactly along ``f`` (the activation is element-wise per hidden
unit), so the sum of slices is the full expert. The output bias ``b2`` is added by one rank only.
Weight gradients stay local: each rank gets the gradient of its own slice.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .accounting import TokenAccounting
from ..distributed import world_and_rank
from .comm import all_gather_v, gather_rows, reduce_scatter_v
from .local_experts import check_routing, compute_experts
from .weights import ExpertSpec, Materialize, split_hidden


class ModelCentricMoE:
    """Callable model-centric MoE layer core.

    ``speeds``: one relative throughput per rank (None: equal); rank ``r`` computes
    ``split_hidden(f, speeds)[r]`` hidden units of every expert (0 is allowed: it only relays).
    """

    mode = "model_centric"

    def __init__(self, spec: ExpertSpec, *, group=None, speeds: Sequence[float] | None = None, accounting: TokenAccounting | None = None):
        self.spec = spec
        self.group = group
        self.world, self.rank = world_and_rank(group)
        self.set_speeds(speeds)
        self.accounting = accounting if accounting is not None else TokenAccounting()

    def set_speeds(self, speeds: Sequence[float] | None) -> None:
        """Re-split ``f`` (e.g. after re-profiling); takes effect on the next call."""
        speeds = [1.0] * self.world if speeds is None else list(speeds)
        if len(speeds) != self.world:
            raise ValueError(f"speeds: got {len(speeds)} values; expected one per rank ({self.world})")
        self.f_sizes = split_hidden(self.spec.ffn_dim, speeds)
        self.f_lo = sum(self.f_sizes[: self.rank])
        self.f_hi = self.f_lo + self.f_sizes[self.rank]
        self.bias_rank = next(r for r, n in enumerate(self.f_sizes) if n > 0)

    def __call__(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        materialize: Materialize,
        layer: int | None = None,
    ) -> torch.Tensor:
        spec = self.spec
        check_routing(hidden, top_k_index, top_k_weights, spec.num_experts)
        t, k = top_k_index.shape
        d = hidden.size(1)
        counts = torch.bincount(top_k_index.reshape(-1).to(torch.int64), minlength=spec.num_experts)
        stats = self.accounting.new_call(self.mode, layer, t, t * k, counts.tolist())

        # sizes, k and d in one tiny all-gather: a shape mismatch raises on every rank instead of hanging
        mine = torch.tensor([t, k, d], dtype=torch.int64, device=hidden.device)
        shapes = gather_rows(mine.unsqueeze(0), [1] * self.world, self.group)
        stats.record("sizes", "all_gather", "forward", mine.numel() * 8 * (self.world - 1), mine.numel() * 8 * (self.world - 1))
        if not bool((shapes[:, 1:] == mine[1:]).all()):
            raise ValueError(f"top_k / hidden size differ across ranks (rows [T, k, d] = {shapes.tolist()}); every rank needs the same k and d")
        sizes = shapes[:, 0].tolist()

        idx_all = gather_rows(top_k_index.to(torch.int32), sizes, self.group)
        nb = 4 * k * (self.world - 1) * max(sizes)
        stats.record("gather_idx", "all_gather", "forward", nb, nb)
        x_all, w_all = all_gather_v((hidden, top_k_weights), sizes, self.group, stats, "gather")

        lo, hi = self.f_lo, self.f_hi
        weights = materialize(list(range(spec.num_experts)), (lo, hi))
        f1 = (2 if spec.gated else 1) * (hi - lo)
        weights.check(spec.num_experts, d, f1, hi - lo, f"materialize(all experts, ({lo}, {hi})) on rank {self.rank}")
        stats.rows_computed = int(idx_all.numel()) if hi > lo else 0
        y_part = compute_experts(x_all, idx_all, w_all, weights, spec, use_b2=self.rank == self.bias_rank)
        return reduce_scatter_v(y_part, sizes, self.group, stats, "reduce_scatter")

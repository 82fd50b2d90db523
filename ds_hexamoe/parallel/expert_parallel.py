"""Expert-parallel MoE: tokens travel to replicas of their experts and back (docs/design.md,
"Execution modes").

Per call: route pairs to replicas by Hecate's rule (:mod:`.replicas`), send each token once per
destination rank together with its per-pair expert slots and routing weights (pairs for experts on
another rank are sentinels), run the destination's hosted experts with ``expert_mlp`` (routing weights
applied there, so their gradients come from the fused kernel), and send the weighted partial outputs
back; the source adds the partials of its destinations. Backward is the reverse all-to-all.

With LSH on (:mod:`.lsh`) the unit sent is a pair instead of a token: pairs bound for another rank
are bucketed per (destination, expert) and sent as centroids, outputs come back unweighted and the
routing weights are applied at the source.
"""
from __future__ import annotations

import os

import torch

from ..config import LSHConfig
from ..ops import build_expert_index
from .accounting import CallStats, TokenAccounting
from ..distributed import world_and_rank
from .comm import all_to_all_rows, all_to_all_split_sizes, all_to_all_v
from .local_experts import check_routing, compute_experts, scatter_rows_add
from .lsh import LSHCompressor, bucket_pairs, centroids
from .replicas import Placement, TablesCache, assign_destinations, placement_digest, placement_weights, validate_placement
from .weights import ExpertSpec, ExpertWeights, Materialize


class ExpertParallelMoE:
    """Callable expert-parallel MoE layer core; holds the placement tables cache and the accounting.

    ``ranks_per_node`` (default ``$LOCAL_WORLD_SIZE`` or the world size) only matters for replica
    choice. ``lsh``: an enabled :class:`~ds_hexamoe.config.LSHConfig` compresses the dispatch;
    ``measure_lsh_error`` also runs the exact path (no grad) each call and records the relative error.
    """

    mode = "expert_parallel"

    def __init__(
        self,
        spec: ExpertSpec,
        *,
        group=None,
        ranks_per_node: int | None = None,
        lsh: LSHConfig | None = None,
        lsh_hash_dim: int | None = None,
        measure_lsh_error: bool = False,
        accounting: TokenAccounting | None = None,
    ):
        self.spec = spec
        self.group = group
        self.world, self.rank = world_and_rank(group)
        rpn = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if rpn < 1:
            raise ValueError(f"ranks_per_node: got {rpn}; expected an integer >= 1")
        self.ranks_per_node = rpn
        self.lsh = LSHCompressor(lsh, lsh_hash_dim) if lsh is not None and lsh.enabled else None
        self.measure_lsh_error = measure_lsh_error
        self.accounting = accounting if accounting is not None else TokenAccounting()
        self._tables = TablesCache()

    # -- call ------------------------------------------------------------------------------------
    def __call__(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        placement: Placement,
        materialize: Materialize,
        layer: int | None = None,
    ) -> torch.Tensor:
        """``out[T, d] = sum_j w[t, j] * expert_{e[t, j]}(x[t])`` with experts hosted per ``placement``."""
        spec = self.spec
        check_routing(hidden, top_k_index, top_k_weights, spec.num_experts)
        k = top_k_index.size(1)
        key = validate_placement(placement, spec.num_experts, self.world)
        weights = placement_weights(placement, key)
        tables = self._tables.get(key, self.world, weights)
        # rides on the counts all-to-all: a rank given another placement or shape raises on every rank
        check = [placement_digest((key, weights)), k, hidden.size(1)]
        hosted = list(tables.hosted[self.rank])

        index = build_expert_index(top_k_index, spec.num_experts)
        flat = top_k_index.reshape(-1).to(torch.int64)
        dest = assign_destinations(flat, index.idx, index.offs, tables, self.rank, self.ranks_per_node)
        # a full-layer materializer returns [E, ...] weights (valid at the hosted experts): index by expert id
        full_layer = bool(getattr(materialize, "full_layer", False))
        slot = flat if full_layer else tables.slot_on(hidden.device)[dest, flat]
        stats = self.accounting.new_call(self.mode, layer, hidden.size(0), flat.numel(), index.counts.tolist())

        cache: list[ExpertWeights] = []

        def get_weights() -> ExpertWeights:
            # called after the counts exchange has checked the placement on every rank
            if not cache:
                w = materialize(hosted, None)
                n = spec.num_experts if full_layer else len(hosted)
                w.check(n, hidden.size(1), spec.f1, spec.ffn_dim, f"materialize({hosted}, None) on rank {self.rank}")
                cache.append(w)
            return cache[0]

        if self.lsh is None:
            return self._exact(hidden, top_k_weights, dest, slot, get_weights, stats, check)
        out = self._compressed(hidden, top_k_weights, dest, slot, get_weights, stats, check)
        if self.measure_lsh_error:
            with torch.no_grad():
                ref = self._exact(hidden, top_k_weights, dest, slot, get_weights, None, check)
                stats.lsh_rel_error = float((out.detach() - ref).double().norm() / ref.double().norm().clamp_min(1e-300))
        return out

    def _exact(self, hidden, top_k_weights, dest, slot, get_weights, stats: CallStats | None, check: list[int]):
        t, k = top_k_weights.shape
        dest_tk, slot_tk = dest.view(t, k), slot.view(t, k)
        goes = torch.zeros(t, self.world, dtype=torch.bool, device=hidden.device)
        goes.scatter_(1, dest_tk, True)
        send_dst, send_tok = goes.t().nonzero(as_tuple=True)  # rank-major, token order inside a rank
        mine = dest_tk.index_select(0, send_tok) == send_dst.unsqueeze(1)  # [S, k] pairs this row carries
        # ids >= the receiver's hosted count are sentinels: that pair is computed on another rank
        send_idx = torch.where(mine, slot_tk.index_select(0, send_tok), self.spec.num_experts).to(torch.int32)
        send_w = torch.where(mine, top_k_weights.index_select(0, send_tok), top_k_weights.new_zeros(()))
        send_splits = goes.sum(0).tolist()

        recv_splits = all_to_all_split_sizes(send_splits, hidden.device, self.group, stats, check)
        idx_recv = all_to_all_rows(send_idx, send_splits, recv_splits, self.group)
        if stats is not None:
            stats.record("dispatch_idx", "all_to_all_v", "forward", *self._meta_bytes(send_idx, send_splits, recv_splits))
            stats.rows_computed = int((idx_recv < self.spec.num_experts).sum())
        x_recv, w_recv = all_to_all_v((hidden.index_select(0, send_tok), send_w), send_splits, recv_splits, self.group, stats, "dispatch")
        y_recv = compute_experts(x_recv, idx_recv, w_recv, get_weights(), self.spec)
        (y_back,) = all_to_all_v((y_recv,), recv_splits, send_splits, self.group, stats, "combine")
        return scatter_rows_add(t, y_back, send_tok, hidden.dtype)

    def _compressed(self, hidden, top_k_weights, dest, slot, get_weights, stats: CallStats, check: list[int]):
        t, k = top_k_weights.shape
        tok = torch.div(torch.arange(t * k, device=hidden.device), k, rounding_mode="floor")
        codes = self.lsh.hasher(hidden.size(1)).codes(hidden).index_select(0, tok)
        b = bucket_pairs(dest, slot, codes, self.rank)
        stats.lsh_compression = b.compression
        x_pairs = hidden.index_select(0, tok)
        cent = centroids(x_pairs, b)
        send_splits = torch.bincount(b.dest, minlength=self.world).tolist()

        recv_splits = all_to_all_split_sizes(send_splits, hidden.device, self.group, stats, check)
        send_idx = b.slot.to(torch.int32).unsqueeze(1)
        idx_recv = all_to_all_rows(send_idx, send_splits, recv_splits, self.group)
        stats.record("dispatch_idx", "all_to_all_v", "forward", *self._meta_bytes(send_idx, send_splits, recv_splits))
        stats.rows_computed = idx_recv.size(0)
        (x_recv,) = all_to_all_v((cent,), send_splits, recv_splits, self.group, stats, "dispatch")
        y_recv = compute_experts(x_recv, idx_recv, None, get_weights(), self.spec)
        (y_back,) = all_to_all_v((y_recv,), recv_splits, send_splits, self.group, stats, "combine")

        y_pairs = y_back.index_select(0, b.of_pair)
        if self.lsh.config.residual:
            y_pairs = y_pairs + (x_pairs - cent.index_select(0, b.of_pair))  # LSH-MoE: E(c) + (x - c)
        w = top_k_weights.reshape(-1, 1)
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        return (y_pairs.to(acc) * w.to(acc)).view(t, k, -1).sum(1).to(hidden.dtype)

    def _meta_bytes(self, t: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> tuple[int, int]:
        row = t.element_size() * t.size(1)
        return row * (sum(send_splits) - send_splits[self.rank]), row * (sum(recv_splits) - recv_splits[self.rank])

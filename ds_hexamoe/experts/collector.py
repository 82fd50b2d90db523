"""Recording routing while the model runs: :class:`RoutingStatsCollector` and the one all-reduce.

The experts forward records into the collector attached to its module's :class:`~.protocol.ExpertsState`
(:func:`attach_collector`), once per MoE layer and micro-batch. Counting is one ``bincount`` per layer
(and one per consecutive layer pair for the affinity) on the routing tensor's device: no host sync, no
per-token Python. Host copies (:class:`~.stats.RoutingStats`) are made only when the statistics are read.

Affinity: within one forward, layers are chained in call order; for the same token rows, every
(choice in layer l, choice in layer l+1) pair counts once, so ``A[l].sum() == T * k_l * k_{l+1}``.
Layers whose token counts differ (Swin's patch merging) get no affinity between them.

Re-computation (activation checkpointing, FSSDP re-materialization) runs a layer's forward again in
backward, which would count its tokens twice. It cannot be detected from inside the forward, so the
collector dedupes by forward boundaries: between two :meth:`~RoutingStatsCollector.step` calls only the
first call per layer counts. Call ``step()`` once per micro-batch, before (or after) its forward.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import dist_on, host_all_reduce
from .protocol import experts_modules, state_of
from .stats import RoutingStats


class RoutingStatsCollector:
    """Accumulates routing counts on device; see the module docstring for the semantics."""

    def __init__(self, affinity: bool = True, dedupe: bool = True):
        self.affinity_enabled = affinity
        self.dedupe = dedupe
        self.reset()

    def reset(self) -> None:
        self._counts: dict[str, Any] = {}  # layer -> LongTensor[E]
        self._tokens: dict[str, int] = {}
        self._top_k: dict[str, int] = {}
        self._aff: dict[tuple[str, str], Any] = {}
        self._order: list[str] = []
        self._seen: set[str] = set()
        self._prev: tuple[str, Any] | None = None  # last recorded (layer, top_k_index) of this forward
        self.forwards = 0
        self.affinity_skipped = 0  # consecutive layers with different token counts
        self.model: dict | None = None

    def step(self) -> None:
        """Mark a forward boundary: the next call per layer counts again."""
        if self._seen:
            self.forwards += 1
        self._seen = set()
        self._prev = None

    def record(self, layer: str, top_k_index, num_experts: int) -> None:
        """Count one layer's routing ``top_k_index[T, k]`` (expert ids < ``num_experts``)."""
        if layer in self._seen:
            if self.dedupe:
                return  # re-computation of a layer already counted in this forward
            self.step()  # without dedupe a repeated layer starts the next forward
        idx = top_k_index.detach()
        if idx.dim() == 1:
            idx = idx.unsqueeze(1)
        if idx.dim() != 2:
            raise ValueError(f"record({layer!r}): top_k_index has shape {list(idx.shape)}; expected [tokens, top_k]")
        idx = idx.long()
        t, k = idx.shape
        if layer not in self._counts:
            self._counts[layer] = torch.zeros(num_experts, dtype=torch.long, device=idx.device)
            self._tokens[layer], self._top_k[layer] = 0, k
            self._order.append(layer)
        elif self._counts[layer].numel() != num_experts or self._top_k[layer] != k:
            raise ValueError(f"record({layer!r}): got {num_experts} experts, top_k={k}; earlier calls had "
                             f"{self._counts[layer].numel()} experts, top_k={self._top_k[layer]}")
        # expert-parallel paths mask non-local choices with ids >= num_experts: a spill bin drops them
        idx = idx.clamp(0, num_experts)
        self._counts[layer] += torch.bincount(idx.reshape(-1), minlength=num_experts + 1)[:num_experts]
        self._tokens[layer] += t
        self._seen.add(layer)
        if self.affinity_enabled and self._prev is not None:
            prev_layer, prev = self._prev
            if prev.shape[0] == t:
                ep = self._counts[prev_layer].numel()
                # every (choice a in prev, choice b in this) pair of the same token row: a * (E + 1) + b
                pair = prev[:, :, None] * (num_experts + 1) + idx[:, None, :]
                m = torch.bincount(pair.reshape(-1), minlength=(ep + 1) * (num_experts + 1))
                m = m.view(ep + 1, num_experts + 1)[:ep, :num_experts]
                key = (prev_layer, layer)
                if key in self._aff:
                    self._aff[key] += m
                else:
                    self._aff[key] = m.clone()
            else:
                self.affinity_skipped += 1
        self._prev = (layer, idx)

    # -- reading ------------------------------------------------------------------------------------
    def snapshot(self) -> RoutingStats:
        """The statistics so far, on the host."""
        counts = {l: [int(v) for v in self._counts[l].tolist()] for l in self._order}
        aff = {key: [[int(v) for v in row] for row in m.tolist()] for key, m in self._aff.items()}
        return RoutingStats(list(self._order), counts, dict(self._tokens), dict(self._top_k), aff,
                            self.forwards + (1 if self._seen else 0), self.model)

    def load(self) -> dict[str, list[int]]:
        return self.snapshot().load()

    def balance(self) -> dict[str, Any]:
        return self.snapshot().balance()

    def to_dict(self) -> dict:
        return self.snapshot().to_dict()

    def save_json(self, path: str | os.PathLike) -> None:
        self.snapshot().save_json(path)

    def all_reduce(self, group=None) -> None:
        """Replace the counts with their sum over the ranks of ``group`` (see :func:`reduce_stats`)."""
        open_forward = 1 if self._seen else 0
        total = reduce_stats(self.snapshot(), group)
        for l in self._order:
            self._counts[l].copy_(torch.tensor(total.counts[l], dtype=torch.long))
            self._tokens[l] = total.tokens[l]
        for key, m in self._aff.items():
            m.copy_(torch.tensor(total.affinity[key], dtype=torch.long))
        # the summed forwards include this rank's open one, which snapshot() adds back
        self.forwards = total.forwards - open_forward


def reduce_stats(stats: RoutingStats, group=None) -> RoutingStats:
    """``stats`` summed over the ranks of ``group`` (a collective; every rank passes the same layers).

    The package's one all-reduce of routing statistics: the runtime, the hetero controller, the Trainer
    callback and :meth:`RoutingStatsCollector.all_reduce` all call it. ``stats`` is not changed, so windows
    of one collector can be reduced again later. Without torch.distributed: ``stats`` itself."""
    if not dist_on() or dist.get_world_size(group) == 1:
        return stats
    keys = (list(stats.layers), sorted(stats.affinity), [len(stats.counts[l]) for l in stats.layers])
    seen: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, keys, group=group)
    for r, other in enumerate(seen):
        if tuple(other) != keys:
            raise RuntimeError(f"reduce_stats: rank {r} recorded layers {other[0]}, this rank {keys[0]}; all ranks must "
                               "run the same MoE layers before statistics can be summed")
    pairs = sorted(stats.affinity)
    flat = [v for l in stats.layers for v in stats.counts[l]] + [stats.tokens[l] for l in stats.layers]
    flat += [v for p in pairs for row in stats.affinity[p] for v in row] + [stats.forwards]
    t = host_all_reduce(torch.tensor(flat, dtype=torch.float64), group=group)  # exact for counts below 2**53
    vals = [int(v) for v in t.round().tolist()]
    off, counts, tokens, aff = 0, {}, {}, {}
    for l in stats.layers:
        n = len(stats.counts[l])
        counts[l] = vals[off:off + n]
        off += n
    for l in stats.layers:
        tokens[l] = vals[off]
        off += 1
    for p in pairs:
        rows = []
        for row in stats.affinity[p]:
            rows.append(vals[off:off + len(row)])
            off += len(row)
        aff[p] = rows
    return RoutingStats(list(stats.layers), counts, tokens, dict(stats.top_k), aff, vals[off], stats.model)


def collector_of(model: nn.Module) -> RoutingStatsCollector | None:
    """The collector the experts modules of ``model`` record into (the first one found), or None."""
    for _, m in experts_modules(model):
        c = state_of(m).collector
        if c is not None:
            return c
    return None


def attach_collector(model: nn.Module, collector: RoutingStatsCollector | None = None, *,
                     affinity: bool = True) -> RoutingStatsCollector:
    """Make every experts module of ``model`` record into one collector and name the modules for it.

    A collector already attached (the Trainer callback's, or the engine's) is shared, never replaced;
    otherwise ``collector`` (or a new one) is attached. Returns the collector in use."""
    current = collector_of(model)
    use = current or collector or RoutingStatsCollector(affinity=affinity)
    for name, m in experts_modules(model):
        st = state_of(m)
        st.name = st.name or name  # statistics are keyed by module name
        st.collector = use
    return use


def detach_collector(model: nn.Module, collector: RoutingStatsCollector) -> None:
    """Stop ``model``'s experts modules recording into ``collector`` (others stay)."""
    for _, m in experts_modules(model):
        st = state_of(m)
        if st.collector is collector:
            st.collector = None

"""Hecate's forward schedule: each layer's experts gathered from a prediction before its router runs.

Per layer, a sliding window of the last ``fssdp.history`` calls' expert loads (tokens per expert and
rank, which every rank learns from the one load all_gather a call needs anyway) predicts which experts
each rank will use. The predicted gather of layer ``l+1`` is issued asynchronously, on a process group
of its own, once layer ``l`` has exchanged its loads (layer 0's when the model's forward starts), so it
overlaps layer ``l``'s experts and layer ``l+1``'s attention; it is waited for right before layer
``l+1``'s experts run.
After the router, experts a rank uses but did not get are fetched by a calibration gather (counted
apart, ``calibrate_bytes``). Every rank computes the same prediction from the same history, so the
exchanges agree without extra messages, and the weights used are the owners' values whatever the
prediction: results equal the synchronous schedule's. Backward is unchanged: gradients of the experts
actually used go back to their owners (docs/fssdp.md, "Scheduling").
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed import group_beside
from .budget import BLOCKED_S, LinkMeter
from .cache import Slot
from .collectives import (Pending, Transfer, UsedLater, all_gather_loads, all_gather_loads_async, plan_transfer,
                          sparse_all_gather)
from .hecate import hecate_placement, hot_count, placement_masks, window_loads
from .layer import WEIGHT_KEYS, ExpertLayer
from .materializer import Materializer
from .ownership import LayerOwnership, load_aware_ownership
from .shard_store import ShardStore
from .telemetry import StepTelemetry


class LoadHistory:
    """Expert loads ``[N][E]`` of a layer's last ``window`` calls, and the prediction made from them."""

    def __init__(self, window: int):
        self._calls: deque = deque(maxlen=window)

    def add(self, counts) -> None:
        """``counts`` ``[N][E]``, or the :class:`Pending` of an asynchronous load exchange (waited on first read)."""
        self._calls.append(counts)

    @property
    def calls(self) -> deque:
        for i, c in enumerate(self._calls):
            if isinstance(c, Pending):
                self._calls[i] = c.wait()
        return self._calls

    def predict(self, ownership: LayerOwnership, budget) -> list[list[bool]] | None:
        """Per rank, the experts to materialize ahead: its owned experts seen in the window (local copies)
        and up to ``budget`` (None: all; a list: rank ``q``'s own) others it used in the window, most loaded
        first. None before any call."""
        if not self.calls:
            return None
        owners = ownership.owners()
        world, num = len(self.calls[0]), len(owners)
        masks = []
        for q in range(world):
            load = [sum(c[q][e] for c in self.calls) for e in range(num)]
            remote = sorted((e for e in range(num) if load[e] > 0 and owners[e] != q), key=lambda e: (-load[e], e))
            b = budget[q] if isinstance(budget, (list, tuple)) else budget
            keep = set(remote if b is None else remote[:b])
            keep.update(e for e in ownership.owned(q) if load[e] > 0)
            masks.append([e in keep for e in range(num)])
        return masks


@dataclass(eq=False)
class Ahead:
    """A predicted gather in flight: into a cache slot, or a fresh buffer when autograd keeps the weights."""

    masks: list[list[bool]]
    transfer: Transfer
    pending: Pending
    slot: Slot | None
    dest: torch.Tensor | None
    issued_at: float = 0.0
    placement: dict[int, list[int]] | None = None  # "hecate" mode: where the layer's experts run

    def valid(self) -> bool:
        # a slot claimed by anyone else since the issue no longer holds the prediction
        return self.slot is None or (self.slot.pending is self.pending and self.slot.owner is None)


class GatherSchedule:
    """The weights provider of data-centric layers: their forward gathers, synchronous (``"sync"``) or
    predicted from each layer's load history and issued ahead with calibration (``"hecate"``)."""

    def __init__(self, fssdp_cfg, model, store: ShardStore, materializer: Materializer, telemetry: StepTelemetry,
                 mode_of: Callable[[int], str], placements_ahead: bool = False):
        f = fssdp_cfg
        self.schedule, self._budget = f.schedule, f.budget
        self._store, self._mat, self._telemetry, self._mode_of = store, materializer, telemetry, mode_of
        self._layers, self._group, self._rank = store.layers, store.group, store.rank
        self._history = {layer.index: LoadHistory(f.history) for layer in self._layers}
        self._ahead: dict[int, Ahead] = {}
        self._meter = LinkMeter()  # fssdp.budget "auto": measured window and bandwidth
        self.prediction_budgets: dict[int, list[int | None]] = {}  # per layer, every rank's last "auto" budget
        self._auto_t: dict[int, Pending] = {}  # "hecate" mode, budget "auto": every rank's measured budget
        self._ahead_group = self._group
        # placements_ahead: layers in the "hecate" mode have their placement materialized ahead too
        if (self.schedule == "hecate" or placements_ahead) and self._layers:
            model.register_forward_pre_hook(self._start_forward)
            # predicted gathers on their own group: a small collective on the main group (the load
            # exchange, a calibration) never queues behind a layer's worth of predicted experts
            self._ahead_group = group_beside(self._group)

    def load_history(self) -> dict[int, list[list[list[int]]]]:
        """``{layer index: [loads [N][E] per call]}``, the window each layer's prediction reads."""
        return {i: list(h.calls) for i, h in self._history.items()}

    def load_aware_ownerships(self, ranks_per_node: int, fallback: list[LayerOwnership] | None = None
                              ) -> list[LayerOwnership]:
        """Per layer, Hecate's load-aware ownership from its load window: each rank keeps its number of
        experts, or takes the number ``fallback[layer]`` gives it (new shard weights); a layer without a
        window keeps its ownership (or takes ``fallback``'s)."""
        world = self._store.world_size
        new = []
        for i, layer in enumerate(self._layers):
            calls = self._history[layer.index].calls
            own = layer.ownership if fallback is None else fallback[i]
            if not calls:
                new.append(own)
                continue
            usage = [[sum(c[q][e] for c in calls) for e in range(own.num_experts)] for q in range(world)]
            load = [sum(u[e] for u in usage) for e in range(own.num_experts)]
            slots = [own.count(r) for r in range(world)]
            new.append(load_aware_ownership(load, usage, slots, ranks_per_node))
        return new

    def record_loads(self, layer: ExpertLayer, counts_e: torch.Tensor) -> None:
        """Add a call of a layer that does not run here (expert-parallel, model-centric) to its load window:
        one asynchronous all_gather of its tokens per expert, waited when the window is read, so load-aware
        re-ownership (Hecate's Algorithm 2) sees every mode."""
        if self._budget != "auto":
            self._history[layer.index].add(all_gather_loads_async(counts_e, self._group, self._telemetry.stats))
            return
        # "auto": this rank's measured budget rides along, so every rank sizes the next placement alike
        num = counts_e.numel()
        mine = self._own_budget(layer)
        extra = torch.tensor([-1 if mine is None else mine], dtype=torch.int32)
        both = all_gather_loads_async(torch.cat([counts_e.to(device="cpu", dtype=torch.int32), extra]), self._group,
                                      self._telemetry.stats)
        self._history[layer.index].add(Pending(None, lambda: [r[:num] for r in both.wait()]))
        self._auto_t[layer.index] = Pending(None, lambda: [r[num] for r in both.wait()])

    def drop_ahead(self) -> None:
        """Finish and forget the predicted gathers in flight (planned on an ownership about to change)."""
        for a in self._ahead.values():
            a.pending.wait()
        self._ahead.clear()

    def provide(self, layer: ExpertLayer, index) -> dict[str, torch.Tensor | None]:
        """``state_of(module).weights(index)``: full-expert-count weights, valid for the experts ``index`` uses."""
        if index is None:
            raise RuntimeError(f"FSSDP experts module {layer.name!r} needs the routing index to materialize weights")
        self._mat.synchronize()
        if self.schedule == "hecate":
            return self._provide_hecate(layer, index)
        counts = all_gather_loads(index.counts, self._group, self._telemetry.stats)  # active masks and history
        self._history[layer.index].add(counts)
        transfer = plan_transfer(layer.ownership, [[c > 0 for c in row] for row in counts], self._rank)
        return _by_key(layer, self._mat.materialize(layer, transfer))

    def _start_forward(self, module, args) -> None:
        self.drop_ahead()  # left from a forward that skipped a layer
        self._issue_ahead(self._layers[0])

    def _issue_ahead(self, layer: ExpertLayer | None) -> None:
        if layer is None or layer.index in self._ahead:
            return
        mode = self._mode_of(layer.index)
        placement = None
        if mode == "hecate":
            placement = self._next_placement(layer)
            if placement is None:
                return
            masks = placement_masks(placement, self._store.world_size, layer.num_experts)
        elif mode == "data_centric" and self.schedule == "hecate":
            budget = self.prediction_budgets.get(layer.index) if self._budget == "auto" else self._budget
            masks = self._history[layer.index].predict(layer.ownership, budget)
            if masks is None:
                return
        else:
            return
        transfer = plan_transfer(layer.ownership, masks, self._rank)
        slot = None
        if self._mat.keeps_weights(layer, keep=placement is not None and transfer.moves):  # see PlacedMaterializer
            dest = torch.zeros(layer.full_numel, dtype=layer.dtype, device=layer.device)
        else:
            slot = self._mat.cache.slot(layer.index, layer.dtype, layer.device)
            slot.claim(None)
            dest = slot.buf
        issued_at = time.perf_counter()
        pending = sparse_all_gather(layer, transfer, layer.full_views(dest), self._ahead_group, self._telemetry.stats,
                                    async_op=True, fanout=self._mat.fanout)
        if slot is not None:
            slot.pending = pending
        self._ahead[layer.index] = Ahead(masks, transfer, pending, slot, dest if slot is None else None, issued_at,
                                         placement)

    def _next_placement(self, layer: ExpertLayer) -> dict[int, list[int]] | None:
        """The "hecate" mode's placement of ``layer`` for this iteration (Algorithm 1 on its load window).
        ``t``: an integer ``fssdp.budget``; under ``"auto"`` the smallest of the ranks' measured budgets (the
        expert gathers the measured window between issue and use hides at the measured link bandwidth,
        Hecate's ``T_nonMoE * bandwidth / expert_bytes``); otherwise, and until every rank has measured, the
        experts above the window's mean load. None before any call."""
        calls = self._history[layer.index].calls
        if not calls:
            return None
        load = window_loads(calls, layer.num_experts)
        t = self._budget if isinstance(self._budget, int) else None
        if self._budget == "auto" and layer.index in self._auto_t:
            measured = [b for b in self._auto_t[layer.index].wait() if b >= 0]
            t = min(measured) if len(measured) == self._store.world_size else None  # every rank measured
        if t is None:
            t = hot_count(load)
        return hecate_placement(load, layer.ownership, t, ranks_per_node(self._store.world_size))

    def take_ahead(self, layer: ExpertLayer) -> Ahead | None:
        """The gather issued ahead for ``layer`` (its placement's experts), and the next layer's issued now
        (it overlaps this layer's experts and the next attention); None when nothing usable was issued."""
        ahead = self._ahead.pop(layer.index, None)
        nxt = self._layers[layer.index + 1] if layer.index + 1 < len(self._layers) else None
        self._issue_ahead(nxt)
        return self._usable(layer, ahead, keep=ahead is not None and ahead.transfer.moves)

    def _usable(self, layer: ExpertLayer, ahead: Ahead | None, keep: bool = False) -> Ahead | None:
        """``ahead``, or None (finished first) when its slot was taken since its issue (by a gather issued
        after it) or it was filled where this call will not read (slot against kept buffer)."""
        if ahead is not None and (not ahead.valid() or (ahead.slot is None) != self._mat.keeps_weights(layer, keep)):
            ahead.pending.wait()
            return None
        return ahead

    def _provide_hecate(self, layer: ExpertLayer, index) -> dict[str, torch.Tensor | None]:
        ahead = self._ahead.pop(layer.index, None)
        nxt = self._layers[layer.index + 1] if layer.index + 1 < len(self._layers) else None
        stats = self._telemetry.stats
        loads = None
        if ahead is not None and self._budget != "auto" and _covers_all(layer.ownership, ahead.masks):
            loads = all_gather_loads_async(index.counts, self._group, stats)
        else:
            counts = self._exchange_loads(index.counts)
        self._issue_ahead(nxt)  # overlaps this layer's calibration and experts, and the next attention
        ahead = self._usable(layer, ahead)  # None: calibrate everything
        if loads is not None:
            if ahead is not None:
                return self._provide_covered(layer, loads, ahead)
            counts = loads.wait()
        self._history[layer.index].add(counts)
        used = [[c > 0 for c in row] for row in counts]
        transfer = plan_transfer(layer.ownership, used, self._rank)  # what backward re-gathers and reduces
        missing = used if ahead is None else [[u and not p for u, p in zip(ur, pr)] for ur, pr in zip(used, ahead.masks)]
        calib = plan_transfer(layer.ownership, missing, self._rank)

        def fill(full: dict[str, torch.Tensor]) -> None:
            if ahead is not None:
                self.finish_ahead(layer, ahead)
            stats = self._telemetry.stats
            if calib.moves:
                stats.calibrations += 1
            t0 = time.perf_counter()
            pending = sparse_all_gather(layer, calib, full, self._group, stats, kind="calibrate_bytes",
                                        fanout=self._mat.fanout)
            pending.wait()
            self._meter.gathered(pending.nbytes, time.perf_counter() - t0)

        dest = ahead.dest if ahead is not None else None
        return _by_key(layer, self._mat.materialize(layer, transfer, fill=fill, dest=dest, slot=layer.index))

    def _provide_covered(self, layer: ExpertLayer, loads: Pending, ahead: Ahead) -> dict[str, torch.Tensor | None]:
        """Every rank has every expert it could use coming (owned ones by a local copy), so no calibration can
        be needed and nobody must wait for the loads now: their exchange (``loads``) runs asynchronously,
        read by the next prediction and, as the experts each rank used, by backward's re-gather and reduce."""
        self._telemetry.stats.loads_deferred += 1
        self._history[layer.index].add(loads)
        transfer = UsedLater(loads, layer.ownership, self._rank)
        rest = [e for e in layer.ownership.owned(self._rank) if not ahead.masks[self._rank][e]]

        def fill(full: dict[str, torch.Tensor]) -> None:
            self.finish_ahead(layer, ahead)
            if rest:  # owned experts not in the window: local copies
                layer.unpack_into(full, rest, layer.pack_local(rest))

        return _by_key(layer, self._mat.materialize(layer, transfer, fill=fill, dest=ahead.dest, slot=layer.index))

    def finish_ahead(self, layer: ExpertLayer, ahead: Ahead) -> None:
        """Finish the predicted gather right before use; the link meter learns from how long it took."""
        used_at = time.perf_counter()
        ahead.pending.wait()
        done = time.perf_counter()
        self._meter.hidden(layer.index, used_at - ahead.issued_at)
        self._meter.gathered(ahead.pending.nbytes, done - ahead.issued_at, done - used_at < BLOCKED_S)

    def _exchange_loads(self, counts_e: torch.Tensor) -> list[list[int]]:
        """Every rank's loads of this layer (``[N][E]``); under ``budget: "auto"`` every rank's own budget
        for every layer rides along (-1: no limit yet), so all ranks predict alike."""
        stats = self._telemetry.stats
        if self._budget != "auto":
            return all_gather_loads(counts_e, self._group, stats)
        num = counts_e.numel()
        mine = [self._own_budget(layer) for layer in self._layers]
        extra = torch.tensor([-1 if b is None else b for b in mine], dtype=torch.int32)
        rows = all_gather_loads(torch.cat([counts_e.to(device="cpu", dtype=torch.int32), extra]), self._group, stats)
        for layer in self._layers:
            self.prediction_budgets[layer.index] = [None if r[num + layer.index] < 0 else r[num + layer.index]
                                                    for r in rows]
        return [r[:num] for r in rows]

    def _own_budget(self, layer: ExpertLayer) -> int | None:
        """This rank's measured budget for ``layer`` (non-owned experts gathered ahead; :mod:`.budget`), at most
        the experts it does not own: the room a full-layer cache slot has for them."""
        size = layer.numel_per_expert * torch.empty(0, dtype=layer.dtype).element_size()
        return self._meter.budget(layer.index, size, layer.num_experts - layer.local_count)


def _by_key(layer: ExpertLayer, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Provider keys (``w1``, ``w2``, ``b1``, ``b2``) over full-layer views keyed by parameter name."""
    return {k: (full[layer.names[k]] if k in layer.names else None) for k in WEIGHT_KEYS}


def _covers_all(ownership: LayerOwnership, masks) -> bool:
    """Whether every rank's predicted experts, with the ones it owns, are all the layer's experts."""
    owners = ownership.owners()
    return all(m[e] or owners[e] == q for q, m in enumerate(masks) for e in range(len(owners)))


def ranks_per_node(world: int) -> int:
    """Ranks per node from the launcher (``LOCAL_WORLD_SIZE``; one node when unset)."""
    v = os.environ.get("LOCAL_WORLD_SIZE")
    if v is None:
        return world
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE: got {v!r}; expected a positive integer (ranks per node) or unset")
    return int(v)

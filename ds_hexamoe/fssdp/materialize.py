"""Materialization: a layer's active experts gathered from their owners into the pipeline-shared cache.

Per layer and step only the experts some rank's tokens activate move: a SparseAllGather forward, whose
backward is the SparseReduceScatter of their gradients to the owners (docs/design.md, "FSSDP").
"""
from __future__ import annotations

import weakref

import torch

from .cache import CallRecord
from .collectives import Transfer, exchange_counts, plan_transfer, sparse_all_gather
from .layer import WEIGHT_KEYS, ExpertLayer


class _Materialize(torch.autograd.Function):
    """Forward: ``fill`` the full-layer views of ``dest`` (at least ``transfer``'s experts). Backward:
    SparseReduceScatter of ``transfer``'s experts to the owners."""

    @staticmethod
    def forward(ctx, mgr, layer, transfer, dest, fill, *shards):
        ctx.set_materialize_grads(False)
        full = layer.full_views(dest)
        fill(full)
        ctx.mgr, ctx.layer, ctx.transfer = mgr, layer, transfer
        ctx.record = mgr._forward_record
        return tuple(full[n] for n in layer.param_names)

    @staticmethod
    def backward(ctx, *grads):
        mgr, layer = ctx.mgr, ctx.layer
        if ctx.record is not None:
            ctx.record.done = True
        mgr._reduce_grads(layer, ctx.transfer, dict(zip(layer.param_names, grads)))
        return (None,) * (5 + len(layer.param_names))


class MaterializeMixin:
    """FSSDPManager's weights provider and the transfers that fill the cache."""

    def _provide(self, layer: ExpertLayer, index) -> dict[str, torch.Tensor | None]:
        """``state_of(module).weights(index)``: full-expert-count weights, valid for the experts ``index`` uses."""
        if index is None:
            raise RuntimeError(f"FSSDP experts module {layer.name!r} needs the routing index to materialize weights")
        self.synchronize()
        if self.schedule == "hecate":
            return self._provide_hecate(layer, index)
        counts = exchange_counts(index.counts, self.group, self.stats)  # the active masks, and the load history
        self._history[layer.index].add(counts)
        transfer = plan_transfer(layer.ownership, [[c > 0 for c in row] for row in counts], self.rank)
        full = self._materialize_transfer(layer, transfer)
        return {k: (full[layer.names[k]] if k in layer.names else None) for k in WEIGHT_KEYS}

    def _materialize_transfer(self, layer: ExpertLayer, transfer: Transfer, fill=None,
                              dest: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{param name: [E, ...]}`` full-layer views holding (at least) the experts ``transfer`` brings here;
        backward reduce-scatters their gradients to the owners (and re-gathers them under rematerialize).
        ``fill(full)`` writes them (default: a synchronous SparseAllGather of ``transfer``); ``dest``: a fresh
        buffer already being filled (kept weights)."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in layer.shards.values())
        if fill is None:
            def fill(full):
                sparse_all_gather(layer, transfer, full, self.group, self.stats, fanout=self.fanout).wait()
        self._forward_record = None
        if grad and not self.rematerialize:
            if dest is None:
                dest = torch.zeros(layer.full_numel, dtype=layer.dtype, device=layer.device)  # kept by autograd
        else:
            slot = self.cache.slot(self._forward_slot(layer), layer.dtype, layer.device)
            record = None
            if grad:
                self._seq += 1
                record = CallRecord(layer=layer, transfer=transfer, seq=self._seq)
                self._records = [r for r in self._records if r() is not None and not r().done]
                self._records.append(weakref.ref(record))
            slot.claim(record)
            self._forward_record = record
            dest = slot.buf
        shards = [layer.shards[n] for n in layer.param_names]
        outs = _Materialize.apply(self, layer, transfer, dest, fill, *shards)
        return dict(zip(layer.param_names, outs))

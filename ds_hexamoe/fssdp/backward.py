"""Backward bookkeeping: re-materialized weights, prefetch, and gradients reduced back to their owners.

Under re-materialization autograd keeps only where a cached weight lived; backward re-gathers it (or
finds it still in the cache) and prefetches the layer backward reaches next. Reduce-scatters may run
asynchronously; :meth:`BackwardMixin.synchronize` finishes them in issue order (docs/design.md, "FSSDP"):
attached to a DeepSpeed engine, as late as possible, at ``engine.step()`` before the gradient norm and
overflow check read them (so they overlap DeepSpeed's own end-of-backward work), or at the next forward;
without an engine, at the end of backward.
"""
from __future__ import annotations

import functools

import torch

from .cache import CallRecord
from .collectives import Pending, Transfer, sparse_all_gather, sparse_reduce_scatter
from .layer import ExpertLayer


class _Handle:
    """What autograd keeps for a cached weight under re-materialization: where it lives, not its data."""

    __slots__ = ("record", "size", "stride", "offset")

    def __init__(self, record, t):
        self.record, self.size, self.stride, self.offset = record, t.size(), t.stride(), t.storage_offset()


class BackwardMixin:
    """FSSDPManager's saved-tensor hooks, backward re-gather with prefetch, and gradient accumulation."""

    def _pack(self, t: torch.Tensor):
        rec = self._forward_record
        if rec is not None and rec.slot is not None and isinstance(t, torch.Tensor) and not t.is_sparse \
                and t.untyped_storage().data_ptr() == rec.slot.buf.untyped_storage().data_ptr():
            return _Handle(rec, t)
        return t

    def _unpack(self, packed):
        if not isinstance(packed, _Handle):
            return packed
        buf = self._ensure_backward(packed.record)
        t = torch.empty(0, dtype=buf.dtype, device=buf.device)
        return t.set_(buf.untyped_storage(), packed.offset, packed.size, packed.stride)

    def _ensure_backward(self, record: CallRecord) -> torch.Tensor:
        """The record's weights, re-gathered into a cache slot unless they are still (or already) there."""
        slot = record.slot
        if slot is not None and slot.owner is record:
            slot.claim(record)  # finishes a prefetch in flight
        else:
            slot = self.cache.slot(self._bwd_turn, record.layer.dtype, record.layer.device)
            slot.claim(record)
            sparse_all_gather(record.layer, record.transfer, record.layer.full_views(slot.buf), self.group,
                              self.stats, kind="regather_bytes", fanout=self.fanout).wait()
        self._bwd_turn = self._slot_index(slot) + 1
        if self.prefetch:
            nxt = self._previous_record(record)
            if nxt is not None:
                other = self.cache.slot(self._bwd_turn, nxt.layer.dtype, nxt.layer.device)
                # a slot still holding a layer backward has yet to reach (forward left two there) is kept
                waiting = other.owner is not None and not other.owner.done and other.owner.slot is other
                if other is not slot and not waiting:
                    other.claim(nxt)
                    other.pending = sparse_all_gather(nxt.layer, nxt.transfer, nxt.layer.full_views(other.buf),
                                                      self.group, self.stats, kind="regather_bytes", async_op=True,
                                                      fanout=self.fanout)
        return slot.buf

    def _slot_index(self, slot) -> int:
        for slots in self.cache._slots.values():
            if slot in slots:
                return slots.index(slot)
        return 0

    def _previous_record(self, record: CallRecord) -> CallRecord | None:
        """The layer call backward reaches next: the latest earlier record still waiting for its weights."""
        best = None
        for ref in self._records:
            r = ref()
            if r is None or r.done or r.seq >= record.seq or (r.slot is not None and r.slot.owner is r):
                continue
            if best is None or r.seq > best.seq:
                best = r
        return best

    def _reduce_grads(self, layer: ExpertLayer, transfer: Transfer, grads: dict) -> None:
        pending = sparse_reduce_scatter(layer, transfer, grads, self.group, self.stats, async_op=self.prefetch,
                                        fanout=self.fanout)
        acc = functools.partial(self._accumulate, layer, pending)
        if self.prefetch:
            self._pending.append(Pending(None, acc))
            if self.engine is None and not self._callback_queued:  # no engine.step() to wait at
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        else:
            acc()

    def _accumulate(self, layer: ExpertLayer, pending: Pending) -> None:
        summed = pending.wait()
        if summed is None:
            return
        scale = 1.0 / self.world_size  # DeepSpeed averages dense gradients over data-parallel ranks
        for n, g in summed.items():
            self.grads[(layer.index, n)].add_(g, alpha=scale)

    def _finish_backward(self) -> None:
        self._callback_queued = False
        self.synchronize()

    def synchronize(self) -> None:
        """Finish every asynchronous reduce-scatter still in flight (FIFO: the order they were issued)."""
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait()

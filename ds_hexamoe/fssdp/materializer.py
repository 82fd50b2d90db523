"""The materializer: a layer's experts gathered from their owners into the pipeline-shared cache, and
their gradients reduced back.

Per layer and step only the experts some rank's tokens activate move: a SparseAllGather forward, whose
backward is the SparseReduceScatter of their gradients to the owners (docs/design.md, "FSSDP").
Under re-materialization autograd keeps only where a cached weight lived; backward re-gathers it (or
finds it still in the cache) and prefetches the layer backward reaches next. Reduce-scatters run
asynchronously, on a process group of their own; :meth:`Materializer.synchronize` finishes them in issue
order: attached to a DeepSpeed engine, as late as possible, at ``engine.step()`` before the gradient norm
and overflow check read them (so they overlap DeepSpeed's own end-of-backward work), or at the next
forward; without an engine, at the end of backward.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from ..distributed import group_beside
from .cache import CallRecord, PipelineCache
from .collectives import Pending, Transfer, sparse_all_gather, sparse_reduce_scatter
from .layer import ExpertLayer
from .shard_store import ShardStore
from .telemetry import StepTelemetry


class _Materialize(torch.autograd.Function):
    """Forward: ``fill`` the full-layer views of ``dest`` (at least ``transfer``'s experts). Backward:
    SparseReduceScatter of ``transfer``'s experts to the owners."""

    @staticmethod
    def forward(ctx, mat, layer, transfer, dest, fill, record, *shards):
        ctx.set_materialize_grads(False)
        full = layer.full_views(dest)
        fill(full)
        ctx.mat, ctx.layer, ctx.transfer, ctx.record = mat, layer, transfer, record
        # frozen experts (LoRA's base) are computed with but get no gradient, so no weight-gradient ESTMM runs
        ctx.mark_non_differentiable(*(full[n] for n in layer.param_names if not layer.shards[n].requires_grad))
        return tuple(full[n] for n in layer.param_names)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.record is not None:
            ctx.record.done = True
        by_name = dict(zip(ctx.layer.param_names, grads))
        ctx.mat.reduce_grads(ctx.layer, ctx.transfer, {n: by_name[n] for n in ctx.layer.grad_names})
        return (None,) * (6 + len(ctx.layer.param_names))


class _Handle:
    """What autograd keeps for a cached weight under re-materialization: where it lives, not its data."""

    __slots__ = ("record", "size", "stride", "offset")

    def __init__(self, record, t):
        self.record, self.size, self.stride, self.offset = record, t.size(), t.stride(), t.storage_offset()


class Materializer:
    """The pipeline cache and everything that fills or drains it: forward gathers, backward re-gather and
    prefetch, gradient reduce-scatters and their pending queue."""

    def __init__(self, store: ShardStore, telemetry: StepTelemetry, *, rematerialize: bool, prefetch: bool,
                 fanout: str, num_slots: int):
        self.store, self.telemetry = store, telemetry
        self.rematerialize, self.prefetch, self.fanout = rematerialize, prefetch, fanout
        # gradient reduces on a group of their own: backward issues them from autograd nodes whose order
        # against the re-gathers (issued when a saved weight is unpacked) may differ between ranks when
        # their graphs differ (expert-parallel replicas), which on one group would mismatch collectives
        self.reduce_group = group_beside(store.group) if store.layers else store.group
        numel = max((layer.full_numel for layer in store.layers), default=0)
        self.cache = PipelineCache(numel=numel, num_slots=num_slots)
        # True once a DeepSpeed engine is attached: its step() finishes the reduces, not the end of backward
        self.engine_driven = False
        self._forward_record: CallRecord | None = None
        self._records: list[weakref.ref] = []
        self._seq = 0
        self._bwd_turn = 0
        self._pending: list[Pending] = []
        self._callback_queued = False

    @property
    def pending_reduces(self) -> int:
        """Gradient reduce-scatters issued and not finished yet."""
        return len(self._pending)

    def keeps_weights(self, layer: ExpertLayer, keep: bool = False) -> bool:
        """Whether autograd keeps this call's weights (no re-materialization, or ``keep``): a fresh buffer, not
        a slot."""
        return (keep or not self.rematerialize) and torch.is_grad_enabled() and any(
            p.requires_grad for p in layer.shards.values())

    def materialize(self, layer: ExpertLayer, transfer: Transfer, fill=None, dest: torch.Tensor | None = None,
                    slot: int = 0, keep: bool = False) -> dict[str, torch.Tensor]:
        """``{param name: [E, ...]}`` full-layer views holding (at least) the experts ``transfer`` brings here;
        backward reduce-scatters their gradients to the owners (and re-gathers them under rematerialize).
        ``fill(full)`` writes them (default: a synchronous SparseAllGather of ``transfer``); ``dest``: a fresh
        buffer already being filled (kept weights); ``slot``: the cache slot otherwise; ``keep``: keep the
        weights for backward even under re-materialization."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in layer.shards.values())
        if fill is None:
            def fill(full):
                sparse_all_gather(layer, transfer, full, self.store.group, self.telemetry.stats,
                                  fanout=self.fanout).wait()
        self._forward_record = None
        record = None
        if grad and (keep or not self.rematerialize):
            if dest is None:
                dest = torch.zeros(layer.full_numel, dtype=layer.dtype, device=layer.device)  # kept by autograd
        else:
            cached = self.cache.slot(slot, layer.dtype, layer.device)
            if grad:
                self._seq += 1
                record = CallRecord(layer=layer, transfer=transfer, seq=self._seq)
                self._records = [r for r in self._records if r() is not None and not r().done]
                self._records.append(weakref.ref(record))
            cached.claim(record)
            self._forward_record = record
            dest = cached.buf
        shards = [layer.shards[n] for n in layer.param_names]
        outs = _Materialize.apply(self, layer, transfer, dest, fill, record, *shards)
        return dict(zip(layer.param_names, outs))

    def saved_tensors_hooks(self):
        """Autograd's saved-tensor hooks for one forward call: cached weights saved by where they live."""
        if self.rematerialize and torch.is_grad_enabled():
            return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        return contextlib.nullcontext()

    def forget_forward_call(self) -> None:
        """The call running now materializes outside the cache: tensors it saves are kept as they are."""
        self._forward_record = None

    def forget_calls(self) -> None:
        """Drop every record of earlier calls (their layout is gone: re-sharding)."""
        self._records, self._forward_record = [], None

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
        group, stats = self.store.group, self.telemetry.stats
        slot = record.slot
        if slot is not None and slot.owner is record:
            slot.claim(record)  # finishes a prefetch in flight
        else:
            slot = self.cache.slot(self._bwd_turn, record.layer.dtype, record.layer.device)
            slot.claim(record)
            sparse_all_gather(record.layer, record.transfer, record.layer.full_views(slot.buf), group, stats,
                              kind="regather_bytes", fanout=self.fanout).wait()
        self._bwd_turn = self.cache.index_of(slot) + 1
        if self.prefetch:
            nxt = self._previous_record(record)
            if nxt is not None:
                other = self.cache.slot(self._bwd_turn, nxt.layer.dtype, nxt.layer.device)
                # a slot still holding a layer backward has yet to reach (forward left two there) is kept;
                # "yet to reach" by sequence, not by ``done``: when a layer's reduce marks it done depends
                # on autograd's order, which may differ between ranks, and this decides a collective
                waiting = (other.owner is not None and other.owner.seq < record.seq and not other.owner.done
                           and other.owner.slot is other)
                if other is not slot and not waiting:
                    other.claim(nxt)
                    other.pending = sparse_all_gather(nxt.layer, nxt.transfer, nxt.layer.full_views(other.buf),
                                                      group, stats, kind="regather_bytes", async_op=True,
                                                      fanout=self.fanout)
        return slot.buf

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

    def reduce_grads(self, layer: ExpertLayer, transfer: Transfer, grads: dict) -> None:
        """SparseReduceScatter of a layer call's weight gradients into the owners' fp32 buffers."""
        # always asynchronous: a rank blocked in a reduce while another blocks in a re-gather (the other
        # group) would wait forever; finished at engine.step() or the end of backward
        pending = sparse_reduce_scatter(layer, transfer, grads, self.reduce_group, self.telemetry.stats,
                                        async_op=True, fanout=self.fanout)

        def accumulate():
            self.store.accumulate(layer, pending.wait())

        self._pending.append(Pending(None, accumulate))
        if not self.engine_driven and not self._callback_queued:  # no engine.step() to wait at
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self._callback_queued = False
        self.synchronize()

    def synchronize(self) -> None:
        """Finish every asynchronous reduce-scatter still in flight (FIFO: the order they were issued)."""
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait()

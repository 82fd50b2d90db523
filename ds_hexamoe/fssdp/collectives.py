"""Sparse collectives of FSSDP: SparseAllGather (owners -> users) and SparseReduceScatter (users -> owners).

Each moves only the experts some rank's tokens activated, each expert only between its owner and the
ranks that used it (Hecate), as one ``all_to_all_single`` with variable splits (works on gloo and NCCL).
When no expert moves anywhere (every rank's data is already local) the collective is skipped on all
ranks alike, which every rank can tell from the exchanged masks.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layer import ExpertLayer
from .ownership import LayerOwnership


@dataclass
class CommStats:
    """Bytes this rank sent (payload) per step, by collective, and per (layer, expert).

    ``as_dict()``: the keys ending in ``bytes`` are disjoint parts of what this rank sent (their sum is
    ``total``); ``received`` and ``per_expert`` (``{(layer, expert): bytes}``) are separate views.
    ``exposed_comm_s``: seconds the calling thread blocked on FSSDP's collectives (not their issue).
    """

    mask_bytes: int = 0  # active-mask (expert load) all_gather
    gather_bytes: int = 0  # forward SparseAllGather (the predicted gather under the hecate schedule)
    calibrate_bytes: int = 0  # forward calibration gather: experts used but not predicted (hecate)
    regather_bytes: int = 0  # backward re-materialization
    reduce_bytes: int = 0  # SparseReduceScatter of gradients
    norm_bytes: int = 0  # expert part of the global gradient norm / overflow flag
    recv_bytes: int = 0  # payload received by this rank (all sparse collectives)
    collectives: int = 0  # sparse all_to_all calls actually issued
    skipped: int = 0  # sparse exchanges skipped because nothing had to move
    experts_sent: int = 0  # expert copies (weights or gradients) sent
    calibrations: int = 0  # calibration gathers issued
    exposed_s: float = 0.0
    exposed_by: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # by what was waited for
    expert_bytes: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total_bytes(self) -> int:
        return (self.mask_bytes + self.gather_bytes + self.calibrate_bytes + self.regather_bytes + self.reduce_bytes
                + self.norm_bytes)

    def as_dict(self) -> dict:
        return {
            "mask_bytes": self.mask_bytes, "gather_bytes": self.gather_bytes, "calibrate_bytes": self.calibrate_bytes,
            "regather_bytes": self.regather_bytes, "calibrations": self.calibrations, "exposed_comm_s": self.exposed_s,
            "exposed_by": dict(self.exposed_by),
            "reduce_bytes": self.reduce_bytes, "norm_bytes": self.norm_bytes, "total": self.total_bytes,
            "received": self.recv_bytes, "collectives": self.collectives, "skipped": self.skipped,
            "experts_sent": self.experts_sent, "per_expert": dict(self.expert_bytes),
        }


@dataclass(frozen=True)
class Transfer:
    """This rank's part of one layer's sparse exchange, derived from everyone's active masks.

    ``sends[q]``: experts this rank owns that rank ``q`` used; ``recvs[o]``: experts rank ``o`` owns
    that this rank used. A gather moves weights along ``sends``; the reduce-scatter moves gradients
    back along ``recvs``. ``local``: owned experts this rank used itself.
    """

    sends: tuple[tuple[int, ...], ...]
    recvs: tuple[tuple[int, ...], ...]
    local: tuple[int, ...]
    moves: bool


def plan_transfer(ownership: LayerOwnership, masks: list[list[bool]], rank: int) -> Transfer:
    n = ownership.world_size
    sends = tuple(tuple(e for e in ownership.owned(rank) if masks[q][e]) if q != rank else () for q in range(n))
    recvs = tuple(tuple(e for e in ownership.owned(o) if masks[rank][e]) if o != rank else () for o in range(n))
    local = tuple(e for e in ownership.owned(rank) if masks[rank][e])
    moves = any(masks[q][e] for o in range(n) for e in ownership.owned(o) for q in range(n) if q != o)
    return Transfer(sends=sends, recvs=recvs, local=local, moves=moves)


@contextmanager
def blocked(stats: CommStats | None, what: str = "other"):
    """Count the enclosed wall time as exposed communication (the thread blocks on a collective), also under
    ``stats.exposed_by[what]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if stats is not None:
            dt = time.perf_counter() - t0
            stats.exposed_s += dt
            stats.exposed_by[what] += dt


def exchange_masks(mask_e: torch.Tensor, group, stats: CommStats) -> list[list[bool]]:
    """All ranks' active-expert masks ``[N][E]`` (one tiny all_gather of ``E`` bytes per rank)."""
    n = dist.get_world_size(group)
    m = mask_e.to(device="cpu", dtype=torch.uint8).contiguous()
    out = [torch.empty_like(m) for _ in range(n)]
    with blocked(stats, "masks"):
        dist.all_gather(out, m, group=group)
    stats.mask_bytes += m.numel() * (n - 1)
    return [t.bool().tolist() for t in out]


def exchange_counts(counts_e: torch.Tensor, group, stats: CommStats) -> list[list[int]]:
    """All ranks' expert loads ``[N][E]`` (tokens per expert; one all_gather of ``4E`` bytes per rank):
    the active masks and the load history in one collective."""
    n = dist.get_world_size(group)
    c = counts_e.to(device="cpu", dtype=torch.int32).contiguous()
    out = [torch.empty_like(c) for _ in range(n)]
    with blocked(stats, "loads"):
        dist.all_gather(out, c, group=group)
    stats.mask_bytes += 4 * c.numel() * (n - 1)
    return [t.tolist() for t in out]


class Pending:
    """An issued (possibly asynchronous) exchange; :meth:`wait` finishes it exactly once (the wait for the
    collective counts into ``stats.exposed_s``)."""

    def __init__(self, work, finish: Callable[[], object], stats: CommStats | None = None, what: str = "other"):
        self._work, self._finish, self._result, self._done = work, finish, None, False
        self._stats, self._what = stats, what

    def wait(self):
        if not self._done:
            if self._work is not None:
                with blocked(self._stats, self._what):
                    self._work.wait()
            self._result = self._finish()
            self._done = True
            self._work = self._finish = None
        return self._result


def _exchange(send_rows, send_counts, recv_counts, width, dtype, device, group, async_op, stats, what):
    recv = torch.empty(sum(recv_counts) * width, dtype=dtype, device=device)
    send = send_rows.reshape(-1).contiguous()
    with blocked(None if async_op else stats, what):
        work = dist.all_to_all_single(
            recv, send, output_split_sizes=[c * width for c in recv_counts],
            input_split_sizes=[c * width for c in send_counts], group=group, async_op=async_op,
        )
    return recv, send, work


def _count(stats: CommStats, layer: ExpertLayer, per_peer: tuple[tuple[int, ...], ...], bytes_per_expert: int, kind: str):
    sent = 0
    for experts in per_peer:
        for e in experts:
            stats.expert_bytes[(layer.index, e)] += bytes_per_expert
            sent += bytes_per_expert
            stats.experts_sent += 1
    setattr(stats, kind, getattr(stats, kind) + sent)


def sparse_all_gather(
    layer: ExpertLayer, transfer: Transfer, full: dict[str, torch.Tensor], group, stats: CommStats,
    *, kind: str = "gather_bytes", async_op: bool = False,
) -> Pending:
    """Materialize every expert this rank used into the full-layer views ``full`` (owned ones by a local copy).
    ``kind``: the :class:`CommStats` field the bytes count into."""
    if transfer.local:
        layer.unpack_into(full, list(transfer.local), layer.pack_local(list(transfer.local)))
    if not transfer.moves:
        stats.skipped += 1
        return Pending(None, lambda: None)
    width, dtype = layer.numel_per_expert, layer.dtype
    send_lists = [list(s) for s in transfer.sends]
    flat_send = [e for s in send_lists for e in s]
    rows = layer.pack_local(flat_send) if flat_send else torch.empty(0, width, dtype=dtype, device=layer.device)
    send_counts = [len(s) for s in send_lists]
    recv_counts = [len(r) for r in transfer.recvs]
    what = kind.replace("_bytes", "") + ("_ahead" if async_op and kind == "gather_bytes" else "")
    recv, send, work = _exchange(rows, send_counts, recv_counts, width, dtype, layer.device, group, async_op, stats, what)
    stats.collectives += 1
    esize = torch.empty(0, dtype=dtype).element_size()
    _count(stats, layer, transfer.sends, width * esize, kind)
    stats.recv_bytes += recv.numel() * esize
    flat_recv = [e for r in transfer.recvs for e in r]

    def finish():
        nonlocal send
        send = None  # the send buffer had to live until the exchange completed
        if flat_recv:
            layer.unpack_into(full, flat_recv, recv.view(len(flat_recv), width))

    return Pending(work if async_op else None, finish, stats, what)


def sparse_reduce_scatter(
    layer: ExpertLayer, transfer: Transfer, grads: dict[str, torch.Tensor | None], group, stats: CommStats,
    *, async_op: bool = False, acc_dtype: torch.dtype = torch.float32,
) -> Pending:
    """Send each used expert's gradient to its owner; the result is ``{name: [E_local, ...]}`` (``acc_dtype``),
    the sum over all ranks that used the expert (zeros for experts nobody used), or None when nothing is owned."""
    width = layer.numel_per_expert
    ref = next((g for g in grads.values() if g is not None), None)
    wire = ref.dtype if ref is not None else layer.dtype
    device = layer.device
    local = list(transfer.local)
    local_rows = layer.pack_grads(grads, local, acc_dtype) if local else None
    if transfer.moves:
        recv_lists = [list(r) for r in transfer.recvs]
        flat = [e for r in recv_lists for e in r]
        rows = layer.pack_grads(grads, flat, wire) if flat else torch.empty(0, width, dtype=wire, device=device)
        # gradients travel back along the gather's routes, reversed
        recv, send, work = _exchange(rows, [len(r) for r in recv_lists], [len(s) for s in transfer.sends],
                                     width, wire, device, group, async_op, stats, "reduce")
        stats.collectives += 1
        esize = torch.empty(0, dtype=wire).element_size()
        _count(stats, layer, transfer.recvs, width * esize, "reduce_bytes")
        stats.recv_bytes += recv.numel() * esize
    else:
        stats.skipped += 1
        recv, send, work = None, None, None

    def finish():
        nonlocal send
        send = None
        count = layer.local_count
        if count == 0:
            return None
        acc = torch.zeros(count, width, dtype=acc_dtype, device=device)
        if local:
            acc.index_add_(0, layer.local_rows(local), local_rows)
        if recv is not None and recv.numel():
            off = 0
            for experts in transfer.sends:  # rank order: a fixed summation order on every run
                if experts:
                    block = recv[off:off + len(experts) * width].view(len(experts), width).to(acc_dtype)
                    acc.index_add_(0, layer.local_rows(experts), block)
                    off += len(experts) * width
        return layer.split_rows(acc)

    return Pending(work if async_op else None, finish, stats, "reduce")

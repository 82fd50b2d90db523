"""What FSSDP's sparse collectives share: byte accounting, blocked-time accounting, handles of issued
exchanges, and one variable-split ``all_to_all_single`` (works on gloo and NCCL).

:mod:`.collectives` (direct exchanges) and :mod:`.tree` (broadcast/reduce trees) build on it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
    collectives: int = 0  # sparse all_to_all calls actually issued (each tree round counts)
    skipped: int = 0  # sparse exchanges skipped because nothing had to move
    experts_sent: int = 0  # expert copies (weights or gradients) sent
    calibrations: int = 0  # calibration gathers issued
    loads_deferred: int = 0  # layer calls whose load exchange ran asynchronously (the prediction covered all)
    trees: int = 0  # sparse exchanges that ran as broadcast/reduce trees (fssdp.fanout)
    tree_rounds: int = 0  # all_to_all rounds those trees took
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
            "experts_sent": self.experts_sent, "loads_deferred": self.loads_deferred, "trees": self.trees, "tree_rounds": self.tree_rounds,
            "per_expert": dict(self.expert_bytes),
        }


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


class Pending:
    """An issued (possibly asynchronous) exchange; :meth:`wait` finishes it exactly once (the wait for the
    collective counts into ``stats.exposed_s``).

    For the link meter of ``fssdp.budget: "auto"``: ``nbytes`` (the larger of what this rank sent and
    received), ``issued_at`` and, once waited, ``done_at`` and ``wait_s`` (seconds :meth:`wait` took)."""

    def __init__(self, work, finish: Callable[[], object], stats: CommStats | None = None, what: str = "other",
                 nbytes: int = 0):
        self._work, self._finish, self._result, self._done = work, finish, None, False
        self._stats, self._what = stats, what
        self.nbytes, self.issued_at = nbytes, time.perf_counter()
        self.done_at: float | None = None
        self.wait_s = 0.0

    def wait(self):
        if not self._done:
            t0 = time.perf_counter()
            if self._work is not None:
                with blocked(self._stats, self._what):
                    self._work.wait()
            self._result = self._finish()
            self._done = True
            self._work = self._finish = None
            self.done_at = time.perf_counter()
            self.wait_s = self.done_at - t0
        return self._result


def exchange(send_rows, send_counts, recv_counts, width, dtype, device, group, async_op, stats, what):
    """One ``all_to_all_single`` of packed rows ``[sum(send_counts), width]``; returns ``(recv, send, work)``
    (keep ``send`` alive until ``work`` completes)."""
    recv = torch.empty(sum(recv_counts) * width, dtype=dtype, device=device)
    send = send_rows.reshape(-1).contiguous()
    with blocked(None if async_op else stats, what):
        work = dist.all_to_all_single(
            recv, send, output_split_sizes=[c * width for c in recv_counts],
            input_split_sizes=[c * width for c in send_counts], group=group, async_op=async_op,
        )
    return recv, send, work


def count_sent(stats: CommStats, layer_index: int, per_peer, bytes_per_expert: int, kind: str) -> int:
    """Account the expert copies ``per_peer`` (experts per destination) under ``kind``; returns the bytes."""
    sent = 0
    for experts in per_peer:
        for e in experts:
            stats.expert_bytes[(layer_index, e)] += bytes_per_expert
            sent += bytes_per_expert
            stats.experts_sent += 1
    setattr(stats, kind, getattr(stats, kind) + sent)
    return sent

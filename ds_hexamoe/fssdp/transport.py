"""What FSSDP's sparse collectives share: handles of issued exchanges and one variable-split
``all_to_all_single`` (works on gloo and NCCL). Their bytes and blocked time count into
:class:`~ds_hexamoe.parallel.accounting.CommStats`.

:mod:`.collectives` (direct exchanges) and :mod:`.tree` (broadcast/reduce trees) build on it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..parallel.accounting import CommStats, blocked


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

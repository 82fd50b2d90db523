"""Emulating a slower rank on identical hardware (CPU benchmarks and tests), and timing local work.

A device ``s`` times slower reaches every collective ``s`` times later after the previous one; that
is all its peers can observe. :class:`CollectiveClock` wraps the ``torch.distributed`` collectives
(DeepSpeed's and FSSDP's both call them through the module) and, just before a collective starts,
sleeps ``(s - 1) x`` the wall time this rank spent outside collectives since the previous one
returned. So the emulated rank does its real compute once, then waits as long as the extra compute
of a slower device would have taken, at the place where the wait matters. Sleeping, unlike repeating
compute, leaves the shared CPU cores to the other ranks.

The same clock records, per step, ``busy`` (wall time outside collectives, the emulated extra
included), ``comm`` (time inside collectives: transfer plus waiting for slower peers) and ``slept``.
An asynchronous collective's handle is wrapped the same way: time spent in its ``wait()`` is
collective time (waiting for a peer), not work to be stretched, so a slow rank that waits on a fast
one's prefetch or reduce-scatter does not sleep for that wait too. Limit: on GPUs the host clock does
not see kernel time (emulation is meant for CPU ranks).

Components: ``expert_slowdown`` stretches expert computation by its own factor (a V100 beside an A40 is
~3.7x slower at long-sequence attention but only ~1.25x at expert GEMMs). The parallel paths announce
where expert work starts and ends, in forward and backward (``parallel.local_experts.PHASE_HOOKS``); at each
boundary the clock settles the work since the last mark at the factor of the phase it ran in.
"""
from __future__ import annotations

import functools
import threading
import time

import torch.distributed as dist

from ..parallel.local_experts import PHASE_HOOKS

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
               "barrier", "reduce", "all_reduce_coalesced", "gather", "scatter", "gather_object", "send", "recv",
               "isend", "irecv")  # point to point: the zebra pipeline (parallel/zebra.py)

_ACTIVE: "CollectiveClock | None" = None


class CollectiveClock:
    """Wraps ``torch.distributed`` collectives in this process; ``slowdown`` > 1 emulates a slower rank."""

    def __init__(self, slowdown: float = 1.0, expert_slowdown: float | None = None):
        self.set_factors(slowdown, expert_slowdown)
        self._experts = False  # inside expert computation: work is stretched by expert_slowdown
        self._originals: dict[str, object] = {}
        self._local = threading.local()
        self.reset()

    def set_factors(self, slowdown: float, expert_slowdown: float | None = None) -> None:
        """``slowdown`` stretches all local work; ``expert_slowdown`` (None: ``slowdown``) expert work."""
        for name, v in (("slowdown", slowdown), ("expert_slowdown", expert_slowdown)):
            if v is not None and not v >= 1.0:
                raise ValueError(f"{name}: got {v!r}; expected a number >= 1")
        self.slowdown = float(slowdown)
        self.expert_slowdown = self.slowdown if expert_slowdown is None else float(expert_slowdown)

    def _phase(self, experts: bool) -> None:
        if experts != self._experts and not getattr(self._local, "inside", False):
            self._settle()
            self._experts = experts

    # -- accounting ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.busy = self.comm = self.slept = 0.0
        self.collectives = 0
        self._mark = time.perf_counter()

    def lap(self) -> dict[str, float]:
        """Totals since the previous lap (or reset), then starts a new lap; time since the last collective
        counts as busy (and is slept for now, so the lap's work is complete)."""
        self._settle()
        self._experts = False  # a phase left open (an expert input without grad) ends with the step
        out = {"busy_s": self.busy, "comm_s": self.comm, "slept_s": self.slept, "collectives": self.collectives}
        self.busy = self.comm = self.slept = 0.0
        self.collectives = 0
        return out

    def _settle(self) -> None:
        now = time.perf_counter()
        work = now - self._mark
        extra = ((self.expert_slowdown if self._experts else self.slowdown) - 1.0) * work
        if extra > 0:
            time.sleep(extra)
            self.slept += extra
        self.busy += work + extra
        self._mark = time.perf_counter()

    # -- patching -----------------------------------------------------------------------------------
    def install(self) -> "CollectiveClock":
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self:
            _ACTIVE.uninstall()
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_hexamoe_clock", False):
                continue
            self._originals[name] = fn
            setattr(dist, name, self._wrap(fn))
        if self._phase not in PHASE_HOOKS:
            PHASE_HOOKS.append(self._phase)
        _ACTIVE = self
        self.reset()
        return self

    def uninstall(self) -> None:
        global _ACTIVE
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()
        if self._phase in PHASE_HOOKS:
            PHASE_HOOKS.remove(self._phase)
        if _ACTIVE is self:
            _ACTIVE = None

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if getattr(self._local, "inside", False):  # a collective built on another one
                return fn(*args, **kwargs)
            work = self._timed(fn, *args, **kwargs)
            return _TimedWork(work, self) if work is not None and hasattr(work, "wait") else work

        timed._hexamoe_clock = True
        return timed

    def _timed(self, fn, *args, _count: bool = True, **kwargs):
        """Run ``fn`` as collective time: settle the work before it, count its wall time as ``comm``."""
        if getattr(self._local, "inside", False):
            return fn(*args, **kwargs)
        self._settle()
        self._local.inside = True
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._local.inside = False
            t1 = time.perf_counter()
            self.comm += t1 - t0
            self.collectives += int(_count)
            self._mark = t1


class _TimedWork:
    """An async collective's handle whose ``wait()`` the clock times as collective time."""

    def __init__(self, work, clock: CollectiveClock):
        self._work, self._clock = work, clock

    def wait(self, *args, **kwargs):
        return self._clock._timed(self._work.wait, *args, _count=False, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


def active_clock() -> CollectiveClock | None:
    return _ACTIVE


def install_clock(profiles, rank: int) -> CollectiveClock | None:
    """The clock for ``profiles[rank]``'s factors, installed, when any rank is slowed (every rank then runs
    one, so all record busy and collective time alike); None when none is."""
    if not any(p.slowdown > 1.0 or (p.expert_slowdown or 1.0) > 1.0 for p in profiles):
        return None
    me = profiles[rank]
    return CollectiveClock(me.slowdown, me.expert_slowdown).install()

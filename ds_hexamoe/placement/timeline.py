"""The event engine of the simulator: per rank a compute stream and a communication stream.

Work on a rank's compute stream runs back to back. A collective (a dispatch, a combine, a gather) starts
on every rank of the group when the last rank reaches it and ends, for all of them, when the slowest
rank's share of the traffic is through: that is where a rank that is fast at one layer waits for a slow
one, layer by layer. Traffic the runtime issues ahead (FSSDP prefetch, replica materialization) runs on
the communication stream beside the compute it hides under and delays nothing. Each piece is an
:class:`Event` when recorded, for the Gantt chart (:func:`~.report.save_timeline`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Event:
    rank: int
    stream: str  # "compute" | "comm"
    start: float
    end: float
    label: str  # what ran: "dense", "experts", "dispatch", "combine", "gather", "wait", ...
    layer: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Timeline:
    """Per-rank clocks of one step; ``record`` keeps :class:`Event` s (off in the planner's inner loop)."""

    def __init__(self, R: int, record: bool = False):
        self.R = R
        self.t = np.zeros(R)  # when each rank's compute stream is free
        self.busy = np.zeros(R)  # seconds each rank spent computing or sending (not waiting)
        self.waited = np.zeros(R)  # seconds each rank spent waiting for a collective's slowest member
        self.record = record
        self.events: list[Event] = []

    def _log(self, r: int, stream: str, a: float, b: float, label: str, layer: int | None) -> None:
        if self.record and b > a:
            self.events.append(Event(r, stream, float(a), float(b), label, layer))

    def compute(self, d: np.ndarray, label: str, layer: int | None = None) -> None:
        """Rank-local work of ``d[r]`` seconds on every rank's compute stream."""
        d = np.broadcast_to(np.asarray(d, dtype=float), (self.R,))
        for r in range(self.R) if self.record else ():
            self._log(r, "compute", self.t[r], self.t[r] + d[r], label, layer)
        self.t = self.t + d
        self.busy += d

    def collective(self, d: np.ndarray, label: str, layer: int | None = None) -> None:
        """A collective in which rank ``r`` moves ``d[r]`` seconds of traffic: it starts when the last
        rank arrives and ends for everyone after the longest share."""
        d = np.broadcast_to(np.asarray(d, dtype=float), (self.R,))
        start = float(self.t.max())
        end = start + float(d.max())
        for r in range(self.R) if self.record else ():
            self._log(r, "compute", self.t[r], start, "wait", layer)
            self._log(r, "comm", start, start + d[r], label, layer)
            self._log(r, "compute", start + d[r], end, "wait", layer)
        self.waited += end - self.t - d
        self.busy += d
        self.t = np.full(self.R, end)

    def hidden(self, d: np.ndarray, label: str, layer: int | None = None) -> None:
        """Traffic issued ahead, on the communication stream from now on (it hides under what follows)."""
        d = np.broadcast_to(np.asarray(d, dtype=float), (self.R,))
        for r in range(self.R) if self.record else ():
            self._log(r, "comm", self.t[r], self.t[r] + d[r], label, layer)

    @property
    def end(self) -> float:
        return float(self.t.max())

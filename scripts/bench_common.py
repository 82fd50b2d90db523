"""What the benchmark scripts share: the machine-load note, results tables, JSON output, timing loops and
the gloo link calibration. Scripts import it by module name (``import bench_common``): a script run as
``python scripts/X.py`` has ``scripts/`` on its path, and tests that import scripts put it there.

It imports no other script (``tests/test_layering.py`` checks that scripts form no import cycle).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple


# ------------------------------------------------------------------------------------------ machine load
def uptime() -> str:
    """The output of ``uptime`` (the load average the numbers were taken under); ``loadavg (...)`` where the
    command is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


# ------------------------------------------------------------------------------------------ output
def write_json(path: str | os.PathLike, data: Any, indent: int = 1, default=None) -> None:
    """``data`` as JSON at ``path`` (UTF-8); ``default`` as for ``json.dump`` (``str`` for odd values)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=indent, default=default)


class Col(NamedTuple):
    """One table column: its title, the format spec of its values (``"<15"``, ``">9.3f"``; the title takes
    the spec's alignment and width), a suffix after each value (``"%"``, ``"x"``: it widens the column) and
    the separator before it (``" "``, ``"  "``)."""
    title: str
    spec: str = ""
    suffix: str = ""
    sep: str = ""


_SPEC = re.compile(r"^(?P<align>[<>^]?)(?P<width>\d*)")


class Table:
    """A fixed-width results table: ``header()``, ``rule()`` (header and a line of dashes under it) and
    ``row(*values)`` (the first ``len(values)`` columns; ``None`` prints as ``-``) give strings."""

    def __init__(self, *cols: Col):
        self.cols = cols

    @staticmethod
    def _width(col: Col) -> int:
        w = _SPEC.match(col.spec).group("width")
        return int(w) + len(col.suffix) if w else 0

    def header(self) -> str:
        out = []
        for c in self.cols:
            align = _SPEC.match(c.spec).group("align") or "<"
            out.append(c.sep + format(c.title, f"{align}{self._width(c)}" if self._width(c) else ""))
        return "".join(out)

    def rule(self) -> str:
        h = self.header()
        return f"{h}\n{'-' * len(h)}"

    def row(self, *values) -> str:
        out = []
        for c, v in zip(self.cols, values):
            cell = "-".rjust(self._width(c)) if v is None else format(v, c.spec) + c.suffix
            out.append(c.sep + cell)
        return "".join(out)


# ------------------------------------------------------------------------------------------ timing
class Laps:
    """Wall-clock laps: ``with laps.lap(keep=i >= warmup): ...`` times the block and keeps the seconds
    (``keep=False``: a warm-up lap, timed and dropped); ``laps.s`` the kept ones, ``laps.last`` the latest."""

    def __init__(self):
        self.s: list[float] = []
        self.last = 0.0

    @contextmanager
    def lap(self, keep: bool = True) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.last = time.perf_counter() - t0
        if keep:
            self.s.append(self.last)

    def median(self) -> float:
        return statistics.median(self.s)


def time_calls(fn, repeats: int, warmup: int = 0, before=None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones; ``before()`` (a barrier, say)
    runs untimed before every call."""
    laps = Laps()
    for i in range(warmup + repeats):
        if before is not None:
            before()
        with laps.lap(keep=i >= warmup):
            fn()
    return laps.s


# ------------------------------------------------------------------------------------------ gloo link
def _link_worker(rank, world, nbytes=8 << 20, repeats=7):
    import torch
    import torch.distributed as dist

    from ds_hexamoe.hetero.profiling import measure_latency

    lat = measure_latency()
    x = torch.zeros(nbytes // 4 // world * world)  # equal splits
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)
    walls = time_calls(lambda: dist.all_to_all_single(y, x), repeats, before=dist.barrier)
    # each rank sends (world - 1) / world of its buffer
    return {"latency_us": lat, "bandwidth_gbps": nbytes * (world - 1) / world / statistics.median(walls) / 1e9}


def calibrate_link(world_size: int) -> dict:
    """Per-collective latency (median tiny all_reduce) and per-rank bandwidth (an 8 MB all_to_all_single)
    of ``world_size`` gloo ranks on this machine: the ``latency_us`` and ``bandwidth_gbps`` the devices
    declare."""
    from ds_hexamoe.testing import run_distributed

    res = run_distributed(_link_worker, world_size, timeout=300)
    return {"latency_us": max(r["latency_us"] for r in res), "bandwidth_gbps": min(r["bandwidth_gbps"] for r in res)}

"""The end-of-run report of a heterogeneous FSSDP run: the plan's shares, its predicted step time against
the measured one, the expert bytes moved per step against replicated experts (docs/recipes.md, "The
default job"); ``summary.json`` also records where the Hugging Face export went.

Measured step time: the median over steps (after the first two) of rank 0's wall time per optimizer
step, as the slowdown clock records it (``busy`` + ``comm``), else the training wall time over the
steps. Replicated experts: with experts replicated data-parallel (``"sharding": "none"``), ZeRO-2
reduce-scatters their gradients and all-gathers their parameters every step, ``2 (W-1)/W`` times the
expert bytes per rank; FSSDP moves the experts some rank's tokens use and their gradients (the
runtime's ``comm_bytes`` of each logged step, median).
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

from ..hetero.calibrate import laps_under_plan

SUMMARY_FILE = "summary.json"  # a run's outcome, in its output_dir


def _measured_step_s(hetero, train_s: float, steps: int) -> tuple[float | None, list[int] | None]:
    """Median step time under the final plan (its first step left out) and the steps it covers; before
    that plan's steps exist, every recorded step from the third on; without a clock, the mean."""
    times = list(getattr(hetero, "step_times", None) or [])
    history = getattr(hetero, "history", None) or []
    laps = (laps_under_plan(times, history[-1]["step"]) if history else []) or times[2:]
    if laps:
        return statistics.median(t["busy_s"] + t["comm_s"] for t in laps), [laps[0]["step"], laps[-1]["step"]]
    return (train_s / steps if steps > 0 else None), None


def _comm_bytes(metrics_path: str) -> float | None:
    if not os.path.exists(metrics_path):
        return None
    vals = []
    with open(metrics_path) as fh:
        for line in fh:
            try:
                v = json.loads(line).get("comm_bytes")
            except ValueError:
                continue
            if isinstance(v, (int, float)):
                vals.append(v)
    return statistics.median(vals[1:] or vals) if vals else None


def _replicated_bytes(runtime, world: int) -> float | None:
    fssdp = getattr(runtime, "fssdp", None)
    layers = getattr(fssdp, "layers", None)
    if not layers or world < 2:
        return None
    expert_bytes = sum(layer.full_numel * layer.dtype.itemsize for layer in layers)
    return 2.0 * (world - 1) / world * expert_bytes


def run_report(engine, world: int, metrics_path: str, train_s: float, steps: int,
               hf_dir: str | None) -> dict[str, Any] | None:
    """The report's numbers (None for a run with neither a plan nor FSSDP); call on rank 0."""
    rt = getattr(engine, "hexamoe", None)
    hetero = getattr(rt, "hetero", None)
    if hetero is None and getattr(rt, "fssdp", None) is None:
        return None
    plan = getattr(hetero, "plan", None)
    pred = dict(getattr(plan, "predicted", None) or {})
    measured, measured_steps = _measured_step_s(hetero, train_s, steps)
    out: dict[str, Any] = {
        "batch_shares": list(hetero.batch_shares) if hetero is not None else None,
        "shard_weights": [round(w, 4) for w in hetero.shard_weights] if hetero is not None else None,
        "slowdowns": [p.slowdown for p in hetero.profiles] if hetero is not None else None,
        "predicted_step_s": pred.get("step_time"),
        "predicted_uniform_step_s": pred.get("uniform_step_time"),
        "measured_step_s": measured,
        "measured_steps": measured_steps,
        "calibration": getattr(hetero, "calibration", None),
        "expert_bytes_per_step": _comm_bytes(metrics_path),
        "replicated_expert_bytes_per_step": _replicated_bytes(rt, world),
        "hf_export": hf_dir,
    }
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def report_lines(rep: dict[str, Any]) -> list[str]:
    """What rank 0 prints at the end of the run."""
    lines = []
    if rep["batch_shares"] is not None:
        lines.append(f"plan: batch shares {rep['batch_shares']} (samples per rank of each micro-batch), FSSDP shard "
                     f"weights {rep['shard_weights']}, declared slowdowns {rep['slowdowns']}")
    p, m = rep["predicted_step_s"], rep["measured_step_s"]
    if p is not None and m is not None:
        u = rep["predicted_uniform_step_s"]
        uni = f"; uniform plan predicted {u * 1e3:.1f} ms" if u is not None else ""
        over = rep.get("measured_steps")
        over = f" (median of steps {over[0]}-{over[1]})" if over else ""
        lines.append(f"step time: predicted {p * 1e3:.1f} ms, measured {m * 1e3:.1f} ms{over} (measured/predicted "
                     f"{m / p:.2f}){uni}")
        cal = rep.get("calibration")
        if cal:
            fs = ", ".join(f"{f:.2f}" for f in cal["factors"])
            lines.append(f"  the prediction is calibrated on steps {cal['steps'][0]}-{cal['steps'][1]}: measured busy time "
                         f"was [{fs}]x the predicted per rank (norms, loss, framework, optimizer and data work that "
                         f"the measured GEMM rates leave out); before it the plan predicted "
                         f"{cal['before_step_s'] * 1e3:.1f} ms")
    moved, repl = rep["expert_bytes_per_step"], rep["replicated_expert_bytes_per_step"]
    if moved is not None and repl:
        lines.append(f"expert bytes per step and rank: {_fmt_bytes(moved)} moved by FSSDP against {_fmt_bytes(repl)} "
                     f"with replicated experts ({moved / repl:.2f}x)")
    return lines  # the export's line is the loop's, printed for every run

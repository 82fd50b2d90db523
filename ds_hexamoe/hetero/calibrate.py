"""Online calibration of what a measured profile does not time: the work outside attention and expert
GEMMs (norms, the loss, the framework's per-module overhead, the optimizer, data), which dominates a
small model on CPU and made the start-up prediction of the embedded default ~3x too short.

After ``CALIBRATION_LAPS`` steps under one plan (its first step skipped: shards may have just moved),
each rank divides the median busy time it measured (the slowdown clock's, collective waits excluded) by
the busy time the plan predicted for it. Every rate of its profile (attention, attention kernel, experts,
memory bandwidth) is divided by that factor, so the same plan would be predicted at the measured time,
and the job re-plans once with the calibrated profiles. The unmodelled work is taken to scale with the
modelled work (one plan gives one point per rank, too few to split a fixed part from a per-sample part).
Only with ``"profile": "measure"`` (declared numbers are the user's), and only when step times are
recorded (the slowdown clock runs; docs/placement.md).
"""
from __future__ import annotations

import dataclasses
import statistics

from ..placement.profiles import DeviceProfile

CALIBRATION_LAPS = 3


def calibration_factor(busy_laps: list[float], predicted_busy_s: float) -> float:
    """Measured over predicted busy time (1.0 without laps or a prediction)."""
    if not busy_laps or predicted_busy_s <= 0:
        return 1.0
    return max(1e-3, statistics.median(busy_laps) / predicted_busy_s)


def calibrated(profile: DeviceProfile, factor: float) -> DeviceProfile:
    """``profile`` with every rate divided by ``factor`` (latency and memory size unchanged)."""
    def div(v):
        return None if v is None else v / factor

    return dataclasses.replace(profile, attn_tflops=div(profile.attn_tflops), expert_tflops=div(profile.expert_tflops),
                               sdpa_tflops=div(profile.sdpa_tflops),
                               memory_bandwidth_gbps=div(profile.memory_bandwidth_gbps))


def laps_under_plan(step_times: list[dict], plan_step: int) -> list[dict]:
    """Recorded steps under the plan applied at ``plan_step``, its first step left out."""
    return [t for t in step_times if t.get("step", 0) > plan_step + 1]

"""Online calibration of measured profiles (ds_hexamoe/hetero/calibrate.py): a rank's rates divided by its
measured/predicted busy ratio make the simulator predict, for the same plan, the busy time measured."""
from __future__ import annotations

import pytest

from ds_hexamoe.experts.stats import synthetic_stats
from ds_hexamoe.hetero.calibrate import calibrated, calibration_factor, laps_under_plan
from ds_hexamoe.placement.costs import CostModel, PlanOptions
from ds_hexamoe.placement.planner import plan
from ds_hexamoe.placement.profiles import load_profiles
from ds_hexamoe.placement.shapes import ModelShape
from ds_hexamoe.placement.simulator import simulate

SHAPE = ModelShape(hidden=64, num_experts=4, top_k=2, expert_ffn=128, num_layers=2, num_moe_layers=2, seq_len=128,
                   num_heads=4, vocab_size=512)


def _profiles():
    return load_profiles([{"name": "a", "tflops": 0.2, "memory_gb": 16, "bandwidth_gbps": 5,
                           "memory_bandwidth_gbps": 10},
                          {"name": "b", "tflops": 0.2, "memory_gb": 16, "bandwidth_gbps": 5, "slowdown": 2.0,
                           "memory_bandwidth_gbps": 10}])


def test_factor_and_laps():
    assert calibration_factor([0.3, 0.2, 0.25], 0.1) == pytest.approx(2.5)  # median over predicted
    assert calibration_factor([], 0.1) == 1.0 and calibration_factor([0.2], 0.0) == 1.0
    laps = [{"step": s, "busy_s": 0.1} for s in range(1, 9)]
    assert [t["step"] for t in laps_under_plan(laps, 5)] == [7, 8]  # the plan's first step is left out


def test_calibrated_profiles_predict_the_measured_busy_time_for_the_same_plan():
    profiles = _profiles()
    stats = synthetic_stats(2, 4, 4096, 2, skew=1.0, seed=0)
    p = plan(profiles, stats, global_batch=16, model_shape=SHAPE, mode="data_centric", shard_by="speed")
    before = simulate(p, CostModel(profiles, stats, SHAPE, 16, PlanOptions(mode="data_centric")))
    factors = [2.5, 3.5]  # what each rank measured over what was predicted
    cal = [calibrated(pr, f) for pr, f in zip(profiles, factors)]
    assert cal[1].attn_tflops == pytest.approx(0.2 / 3.5) and cal[1].slowdown == 2.0
    after = simulate(p, CostModel(cal, stats, SHAPE, 16, PlanOptions(mode="data_centric")))
    for r, f in enumerate(factors):  # the compute scales exactly; the link time of the layer's gathers does not
        assert after.dense[r] == pytest.approx(f * before.dense[r], rel=1e-9)
        assert after.busy[r] == pytest.approx(f * before.busy[r], rel=0.02), (r, before.busy, after.busy)
        assert after.busy[r] < f * before.busy[r]

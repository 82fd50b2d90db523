"""The event-driven simulator: per-layer synchronization against a hand-computed schedule, the recorded
timeline against the per-rank totals, the `plan --timeline` Gantt chart and the bound on rank counts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ds_hexamoe.config import ConfigError
from ds_hexamoe.experts.stats import synthetic_stats
from ds_hexamoe.placement.costs import CostModel, PlanOptions
from ds_hexamoe.placement.plan import Plan
from ds_hexamoe.placement.profiles import MAX_RANKS, DeviceProfile, load_profiles
from ds_hexamoe.placement.shapes import ModelShape
from ds_hexamoe.placement.simulator import simulate

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "ds_hexamoe", "placement", "examples")
SMALL = ModelShape(hidden=1024, expert_ffn=2048, num_experts=4, top_k=1, num_moe_layers=2, seq_len=1024,
                   num_heads=16, vocab_size=8192)


def _ep_plan(cost: CostModel, F: np.ndarray, shares: list[int]) -> Plan:
    placement, fractions = Plan.tables_from(cost.stats.layers, F)
    half = SMALL.expert_ffn // 2
    return Plan([p.name for p in cost.profiles], cost.G, cost.seq, shares, [0.5, 0.5], list(cost.stats.layers),
                {l: "expert_parallel" for l in cost.stats.layers}, placement, fractions,
                [[0, half], [half, SMALL.expert_ffn]], solver="test")


def test_ranks_wait_for_each_other_at_every_layer():
    """Layer 0's experts all on rank 0, layer 1's on rank 1: each rank's total work is the same, so a
    max-of-sums model (the old simulator) predicts no waiting; the runtime synchronizes at every dispatch
    and combine, so the step is the sum of the per-layer maxima (links so fast that traffic is ~0)."""
    profiles = [DeviceProfile(f"r{r}", 100.0, 100.0, int(80e9), 1e9) for r in range(2)]
    stats = synthetic_stats(2, 4, 500, 1, seed=0)
    cost = CostModel(profiles, stats, SMALL, 8, PlanOptions())
    F = np.zeros((2, 4, 2))
    F[0, :, 0] = 1.0
    F[1, :, 1] = 1.0
    sim = simulate(_ep_plan(cost, F, [4, 4]), cost)
    expert = cost.loads.sum(axis=1) * cost.pair_cost[0]  # [L]: one layer's expert seconds, all on one rank
    dense = cost.dense_time(np.array([4.0, 4.0]))[0]
    assert sim.busy == pytest.approx([dense + expert[0], dense + expert[1]], rel=1e-6)
    assert sim.step_time == pytest.approx(dense + expert.sum() + sim.sync, rel=1e-6)
    assert sim.sum_bound == pytest.approx(dense + max(expert) + sim.sync, rel=1e-6)
    assert sim.step_time > 1.25 * sim.sum_bound  # the bubbles a max-of-sums model does not see
    assert sim.idle == pytest.approx([expert[1], expert[0]], rel=1e-6)


def test_timeline_accounts_for_every_second():
    profiles = load_profiles(["H100", "A100-80GB", "V100-32GB"])
    stats = synthetic_stats(2, 4, 500, 1, seed=1)
    from ds_hexamoe.placement.planner import plan

    for mode in ("data_centric", "expert_parallel", "model_centric"):
        p = plan(profiles, stats, global_batch=12, model_shape=SMALL, mode=mode)
        cost = CostModel(profiles, stats, SMALL, 12, PlanOptions(mode=mode))
        sim = simulate(p, cost, timeline=True)
        assert sim.step_time == pytest.approx(p.predicted["step_time"])
        for r in range(3):
            ev = sorted((e for e in sim.timeline if e["rank"] == r and e["stream"] == "compute"), key=lambda e: e["start"])
            # the compute stream never runs two things at once and ends with the step (before the sync)
            assert all(a["end"] <= b["start"] + 1e-12 for a, b in zip(ev, ev[1:]))
            assert ev[-1]["end"] <= sim.step_time - sim.sync + 1e-12
            work = sum(e["end"] - e["start"] for e in ev if e["label"] != "wait")
            sent = sum(e["end"] - e["start"] for e in sim.timeline if e["rank"] == r and e["stream"] == "comm"
                       and e["label"] not in ("prefetch", "materialize"))
            waited = sum(e["end"] - e["start"] for e in ev if e["label"] == "wait")
            assert work + sent == pytest.approx(sim.busy[r], rel=1e-9)
            tail = sim.step_time - sim.sync - ev[-1]["end"]  # done before the slowest rank's optimizer step
            assert waited + tail == pytest.approx(sim.idle[r], rel=1e-6, abs=1e-12)


def test_plan_cli_timeline(tmp_path, capsys):
    from ds_hexamoe.cli.plan import plan_main

    png = tmp_path / "t.png"
    rc = plan_main(["--devices", os.path.join(EXAMPLES, "devices.json"), "--stats", os.path.join(EXAMPLES, "routing.json"),
                    "--global-batch", "48", "--timeline", str(png)])
    assert rc == 0 and f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_huge_device_count_is_refused_before_work(tmp_path, capsys):
    """Used to end in a numpy MemoryError (the ideal bound's dense LP matrix at 10^5 ranks)."""
    from ds_hexamoe.cli.plan import plan_main

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"devices": [{"name": "H100", "count": 4}, {"name": "A40", "count": 10**7}]}))
    rc = plan_main(["--devices", str(path), "--stats", os.path.join(EXAMPLES, "routing.json")])
    err = capsys.readouterr().err
    assert rc == 2 and f"devices[1].count: {10**7 + 4} ranks in all; the planner handles at most {MAX_RANKS}" in err
    with pytest.raises(ConfigError, match="devices: 8193 ranks in all"):
        CostModel([DeviceProfile("x", 1.0, 1.0, int(1e9), 1.0)] * (MAX_RANKS + 1), synthetic_stats(1, 4, 10, 1),
                  SMALL, 8, PlanOptions())


def test_hecate_schedule_hides_the_predicted_gather_and_pays_the_calibration():
    """FSSDP's "hecate" forward: the window's experts are gathered ahead under dense compute; only what
    the router picks beyond them stays exposed. With ample dense time the exposed forward gather is the
    calibration alone (far below "sync"'s); with none, the whole over-fetched window is exposed (above it)."""
    profiles = [DeviceProfile(f"r{r}", 100.0, 100.0, int(80e9), 1e9) for r in range(2)]
    stats = synthetic_stats(2, 4, 500, 1, skew=1.0, seed=0)
    shares, sw = np.array([4.0, 4.0]), np.array([0.5, 0.5])
    sync = CostModel(profiles, stats, SMALL, 8, PlanOptions(schedule="sync"))
    hecate = CostModel(profiles, stats, SMALL, 8, PlanOptions(schedule="hecate", history=5))
    l = 1
    compute = sync.dc_parts(l, shares, sw)[0]
    used_s, hidden_s = sync.dc_forward(l, shares, sw, compute)
    assert not hidden_s.any()
    n = shares * SMALL.seq_len * hecate.k[l]
    per_expert = 0.5 * SMALL.expert_bytes / hecate.bw
    used = 1 - np.exp(-np.outer(n, hecate.p[l]))
    window = 1 - np.exp(-5 * np.outer(n, hecate.p[l]))
    calibrate = (used * (1 - window)).sum(axis=1) * per_expert
    ahead = window.sum(axis=1) * per_expert
    hecate.dense_per_sample = np.full(2, 1e3)  # dense compute hides any gather
    exposed, hidden = hecate.dc_forward(l, shares, sw, compute)
    assert exposed == pytest.approx(calibrate) and hidden == pytest.approx(ahead)
    assert (exposed < 0.5 * used_s).all()
    hecate.dense_per_sample = np.zeros(2)
    exposed, hidden = hecate.dc_forward(0, shares, sw, compute)  # layer 0: nothing before it to hide under
    assert exposed == pytest.approx(ahead + calibrate) and not hidden.any()
    assert (exposed >= used_s).all()


@pytest.mark.parametrize("field,value", [("schedule", "eager"), ("history", 0)])
def test_bad_schedule_options_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PlanOptions(**{field: value}).validate(2)

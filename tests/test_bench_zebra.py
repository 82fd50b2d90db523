"""``scripts/bench_zebra.py`` at a tiny shape, 2 gloo ranks, one timed step per plan: the JSON has the keys the
issue names (``zebra_tokens_per_s``, ``best_plan_tokens_per_s``, ``uniform_ep_tokens_per_s``,
``asym_ea_tokens_per_s``, ``param_bytes_per_rank``) with finite numbers, the no-bubble figure is labelled as the
upper bound it is, and the expert rank holds no attention weight (tests never check timing)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench_zebra  # noqa: E402


@pytest.mark.slow
def test_bench_zebra_smoke(tmp_path, capsys):
    out = tmp_path / "zebra.json"
    bench_zebra.main(["--world", "2", "--rounds", "1", "--steps", "1", "--seq", "32", "--d", "32", "--ffn", "48",
                      "--experts", "4", "--batch", "4", "--micro-batches", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    for key in ("zebra_tokens_per_s", "best_plan_tokens_per_s", "uniform_ep_tokens_per_s", "asym_ea_tokens_per_s"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    bound = data["zebra_no_bubble_bound_over_best_plan"]
    assert set(bound) == {"zebra", "zebra_asym_ea"} and all(v > 0 for v in bound.values())
    mem = data["param_bytes_per_rank"]
    assert mem["roles"] == ["attention", "experts"]
    assert sum(mem["zebra"]) == mem["colocated_replicated"][0]  # the model is held once, split by role
    assert data["uptime_start"] and data["goal_zebra_over_best_plan"] == 1.2
    said = capsys.readouterr().out
    assert "upper bound, no pipeline bubble" in said and "uptime at start" in said

"""scripts/bench_papers.py and scripts/paper_setups.py: the papers' setups run end to end and put the
papers' numbers beside the simulated ones (structure and direction, never timing), and the two-tier
network fold (ds_hexamoe.placement.topology) gives the bandwidth the tiers allow."""
from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import pytest

from ds_hexamoe.config import ConfigError
from ds_hexamoe.placement.topology import TwoTierNetwork

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("bench_papers"), importlib.import_module("paper_setups")


def test_two_tiers_fold_into_one_bandwidth():
    v100 = TwoTierNetwork(8, 150.0, 100.0)  # Hecate's Cluster A: NVLink inside, 100 Gbit/s NIC per node
    assert v100.inter_gbytes_per_s == pytest.approx(100 / 8 / 8)
    assert v100.split(32) == pytest.approx((7 / 31, 24 / 31))
    # the NIC share is the bottleneck: 24/31 of the bytes at 1.5625 GB/s
    assert v100.effective_gbytes_per_s(32) == pytest.approx(1 / (24 / 31 / 1.5625))
    assert v100.effective_gbytes_per_s(8) == pytest.approx(150.0)  # one node: NVLink only
    # more nodes, more of the traffic on the shared NIC
    assert v100.effective_gbytes_per_s(32) < v100.effective_gbytes_per_s(16) < v100.effective_gbytes_per_s(8)
    # a fast NIC leaves NVLink the bottleneck
    fat = TwoTierNetwork(2, 10.0, 8000.0)
    assert fat.effective_gbytes_per_s(4) == pytest.approx(1 / (1 / 3 / 10.0))


@pytest.mark.parametrize("kwargs, field", [({"gpus_per_node": 0}, "gpus_per_node"),
                                           ({"intra_gbytes_per_s": -1.0}, "intra_gbytes_per_s"),
                                           ({"nic_gbits_per_s": True}, "nic_gbits_per_s")])
def test_two_tiers_reject_bad_input(kwargs, field):
    with pytest.raises(ConfigError, match=f"network.{field}"):
        TwoTierNetwork(**{"gpus_per_node": 8, "intra_gbytes_per_s": 150.0, "nic_gbits_per_s": 100.0, **kwargs})
    with pytest.raises(ConfigError, match="multiple of network.gpus_per_node"):
        TwoTierNetwork(8, 150.0, 100.0).split(12)


def test_hetermoe_table_rows_and_paper_numbers(scripts, tmp_path, capsys):
    bench, ps = scripts
    out = tmp_path / "p.json"
    assert bench.main(["--only", "hetermoe", "--seqs", "8192", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if "skipped" not in r]
    assert len(rows) == 3 * 4 and "uptime" in data and data["hecate"] == data["moetuner"] == []
    for r in rows:
        # the event-driven step is never shorter than the max-of-sums bound, nor the ideal
        assert r["step_s"] >= r["sum_bound_s"] * (1 - 1e-9) and r["step_s"] >= r["ideal_s"]
        assert sum(r["shares"]) == r["global_batch"] == 8
    summary = data["hetermoe"]
    assert [s["setup"] for s in summary] == list(bench.SETUPS)
    for s in summary:
        # 8K: the paper gives no number in its text; never invented
        assert s["paper_hetermoe_over_ep"] is None and "not found" in s["paper_cite"]
        assert s["paper_hetermoe_over_ideal"] == 1.18 and "2504.03871" in s["paper_ideal_cite"]
        assert s["zebra_over_ep"] == pytest.approx(s["uniform_ep_s"] / s["zebra_s"]) and s["why"]
    text = capsys.readouterr().out
    assert "tokens/s" in text and "paper HeterMoE/EP" in text and "not found" in text


def test_hecate_rows_under_the_honest_protocol(scripts, tmp_path, capsys):
    """The acceptance JSON at a tiny size: one setup, one model, one drift, two scored iterations."""
    bench, ps = scripts
    out = tmp_path / "h.json"
    assert bench.main(["--only", "hecate", "--hecate-setups", "16xV100-100G", "--hecate-models", "S",
                       "--drift-every", "5", "--iterations", "7", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == data["hetermoe"] == data["moetuner"] == [] and "uptime" in data
    honest, oracle = data["hecate"]
    for r in (honest, oracle):
        assert r["setup"] == "16xV100-100G" and r["ranks"] == 16 and r["model"] == "GPT-MoE-S"
        assert r["paper_over_ep"] == [1.40, 1.58] and "Fig. 9" in r["paper_cite"]
        assert r["simulated_over_ep"] > 0
    assert honest["oracle"] is False and oracle["oracle"] is True
    assert "decided from the 5 iterations before, scored on the next" in honest["protocol"]
    assert "upper bound" in oracle["protocol"]
    steps = honest["steps_s"]
    assert set(steps) == {"ep", "hecate", "hecate_auto", "fssdp_dc", "fssdp_rep", "fastermoe"}
    assert honest["simulated_over_ep"] == pytest.approx(steps["ep"] / steps["hecate"])
    assert honest["memory_ok"] and honest["why"]
    # every contender but the modelled FasterMoE is a configuration the runtime accepts
    assert honest["runtime_config"]["fastermoe"] is None
    assert honest["runtime_config"]["hecate"]["mode"] == "hecate"
    text = capsys.readouterr().out
    assert "protocol (the first is the headline)" in text and "upper bound" in text and "1.40-1.58x" in text


def test_hecate_protocol_rejects_a_window_that_leaves_nothing_to_score(scripts):
    bench, _ = scripts
    with pytest.raises(SystemExit):
        bench.main(["--only", "hecate", "--iterations", "5", "--window", "5"])


def test_resident_experts_pay_no_materialization(scripts):
    _, ps = scripts
    profiles, _ = ps.hecate_profiles("A", 8)
    model = ps.gpt_moe("S", 16)
    from ds_hexamoe.experts.stats import synthetic_stats
    from ds_hexamoe.placement.costs import CostModel, PlanOptions
    stats = synthetic_stats(model.num_moe_layers, 16, 2048, 2, seed=0)
    resident = ps.ResidentCost(profiles, stats, model, 8, PlanOptions())
    sharded = CostModel(profiles, stats, model, 8, PlanOptions())
    sw = sharded.shard_weights()
    assert not resident.host_cost(sw).any() and sharded.host_cost(sw).min() > 0
    F = ps.owner_fractions(model.num_moe_layers, 16, 8, np.arange(16) % 8)
    assert ps.step(resident, F, "expert_parallel", "ep")["step_s"] <= ps.step(sharded, F, "expert_parallel", "ep")["step_s"]


def test_moetuner_only_switch(scripts, tmp_path, capsys):
    bench, ps = scripts
    out = tmp_path / "m.json"
    assert bench.main(["--only", "moetuner", "--ilp-time", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == data["hetermoe"] == data["hecate"] == []
    got = {r["setup"]: r for r in data["moetuner"]}
    assert set(got) == {"8xH100", "16xH200"}
    assert got["8xH100"]["paper_contiguous_over_ilp"] == 1.093 and got["16xH200"]["paper_contiguous_over_ilp"] == 1.175
    for r in got.values():
        assert r["paper_eplb_over_ilp"] is None  # the paper does not compare with EPLB
        assert r["ilp_s"] <= r["contiguous_s"] * 1.001 and r["contiguous_over_ilp"] == pytest.approx(
            r["contiguous_s"] / r["ilp_s"])
    # two nodes: the inter-node NIC makes the blended link far slower than one node's NVLink
    assert got["16xH200"]["effective_gbytes_per_s"] < got["8xH100"]["effective_gbytes_per_s"] / 5
    assert "paper contig/ILP" in capsys.readouterr().out

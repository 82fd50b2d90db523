"""Recorded routing traces: ``ds-hexamoe profile-routing --trace`` rows against the routing of a plain eager
forward on the same batches, the file's schema and its errors, and ``scripts/bench_papers.py --hecate-trace``
(that the protocol never sees the scored iteration of a recorded trace: tests/test_hecate_sim.py)."""
from __future__ import annotations

import importlib
import json
import os
import pathlib

import numpy as np
import pytest
import torch

from ds_hexamoe.config import ConfigError
from ds_hexamoe.experts.stats import RoutingStats
from ds_hexamoe.experts.trace import RoutingTrace
from ds_hexamoe.placement.protocol import trace_from_file
from ds_hexamoe.testing import run_distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "ds_hexamoe/data/recipes/mixtral-tiny-finetune.json")
SHIPPED = str(REPO / "ds_hexamoe/data/traces/mixtral-tiny-finetune.json")


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("bench_papers"), importlib.import_module("paper_hecate")


def _eager_counts(recipe, batches) -> np.ndarray:
    """``[batch, layer, expert]`` pairs from the router logits of the checkpoint run with transformers' eager
    experts (no ds-hexamoe code in the forward): top-k of each token's logits, counted per expert."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, experts_implementation="eager").eval()
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"),
                           output_router_logits=True).router_logits
            out.append([torch.bincount(lg.topk(k, dim=-1).indices.reshape(-1), minlength=E).tolist() for lg in logits])
    return np.array(out)


def test_trace_rows_equal_an_eager_forward_on_the_same_batches(tmp_path):
    from ds_hexamoe.cli.profile_routing import _recipe_model_and_batches, profile_main
    from ds_hexamoe.recipes import load_recipe

    stats_file, trace_file = tmp_path / "routing.json", tmp_path / "trace.json"
    assert profile_main([RECIPE, "--batches", "3", "--out", str(stats_file), "--trace", str(trace_file)]) == 0
    trace = RoutingTrace.load_json(trace_file)
    recipe = load_recipe(RECIPE)
    _, batches = _recipe_model_and_batches(recipe, 3)
    want = _eager_counts(recipe, batches)
    got = np.array(trace.counts)
    assert got.shape == (3, 2, 4) and np.array_equal(got, want)
    assert trace.tokens == [[8 * 128] * 2] * 3 and trace.top_k == [2, 2] and trace.num_experts == [4, 4]
    # the rows add up to the collector's totals, which profile-routing writes beside them
    stats = RoutingStats.load_json(stats_file)
    assert [stats.counts[l] for l in stats.layers] == got.sum(axis=0).tolist() and trace.layers == stats.layers
    assert trace.model["num_experts"] == 4 and trace.source["recipe"] == "mixtral-tiny-finetune"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # atomic write left no temp file


def _recorder_worker(rank: int, world: int) -> tuple[list, list]:
    """Per rank: the trace rows the recorder makes (summed over ranks) and this rank's own routing per
    forward, from the router logits of the same forwards."""
    import transformers

    import ds_hexamoe  # noqa: F401  (registers "hexamoe")
    from ds_hexamoe.hetero.routing import profile_routing, trace_recorder

    cfg = transformers.AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="hexamoe")
    gen = torch.Generator().manual_seed(100 + rank)  # each rank routes different tokens
    batches = [torch.randint(0, 64, (2, 8 + 4 * rank), generator=gen) for _ in range(3)]
    rows: list = []
    profile_routing(model, batches, after_forward=trace_recorder(rows))
    with torch.no_grad():
        own = [[torch.bincount(lg.topk(2, dim=-1).indices.reshape(-1), minlength=4).tolist()
                for lg in model(b, output_router_logits=True).router_logits] for b in batches]
    return [[r.counts[l] for l in r.layers] for r in rows], own


@pytest.mark.slow
def test_trace_rows_are_summed_over_ranks():
    (rows0, own0), (rows1, own1) = run_distributed(_recorder_worker, 2, timeout=120)
    assert rows0 == rows1 == (np.array(own0) + np.array(own1)).tolist()
    assert own0 != own1  # the ranks routed differently, so the sum is not one rank's counts doubled


def _trace_dict(**over) -> dict:
    d = RoutingTrace(["a", "b"], [3, 3], [2, 2], [[[2, 1, 1], [0, 2, 2]]] * 2, [[2, 2]] * 2).to_dict()
    return d | over


@pytest.mark.parametrize("over, field", [
    ({"format": "x"}, "trace.format"), ({"version": 2}, "trace.version"), ({"row": "step"}, "trace.row"),
    ({"counts": [], "tokens": []}, "trace.counts: empty"), ({"layers": ["a", "a"]}, "trace.layers"),
    ({"counts": [[[2, 1], [0, 2, 2]]] * 2}, r"trace.counts\[0\]\[0\]"),
    ({"counts": [[[2, 1, 1], [0, 2, 2]], [[5, 0, 0], [0, 2, 2]]]}, r"trace.counts\[1\]\[0\]: sum 5"),
    ({"tokens": [[2, 2]]}, "trace.tokens"), ({"extra": 1}, "trace.extra: unknown key")])
def test_trace_file_errors_name_the_field(over, field):
    RoutingTrace.from_dict(_trace_dict())
    with pytest.raises(ConfigError, match=field):
        RoutingTrace.from_dict(_trace_dict(**over))


def test_trace_file_against_the_model_shape(tmp_path):
    path = tmp_path / "t.json"
    RoutingTrace.from_dict(_trace_dict()).save_json(path)
    assert trace_from_file(path).shape == (2, 2, 3)
    assert trace_from_file(path, 2, 3).tolist() == [[[2, 1, 1], [0, 2, 2]]] * 2
    with pytest.raises(ConfigError, match="2 MoE layers of 3 experts; the model it is replayed on has 12 of 3"):
        trace_from_file(path, 12, 3)
    with pytest.raises(ConfigError, match="has 2 of 8"):
        trace_from_file(path, None, 8)
    with pytest.raises(ConfigError, match="2 rows; expected at least 6"):
        trace_from_file(path, min_rows=6)
    with pytest.raises(ConfigError, match="does not exist"):
        trace_from_file(tmp_path / "missing.json")


def test_bench_papers_runs_the_honest_protocol_on_a_recorded_trace(scripts, tmp_path, capsys):
    bench, _ = scripts
    out = tmp_path / "h.json"
    assert bench.main(["--only", "hecate", "--hecate-trace", SHIPPED, "--hecate-setups", "16xV100-100G", "trace-sized",
                       "--hecate-models", "S", "--json", str(out)]) == 0
    skipped, honest, oracle = json.loads(out.read_text())["hecate"]
    assert skipped["setup"] == "16xV100-100G" and "12 of 32" in skipped["skipped"] and "trace-sized" in skipped["skipped"]
    assert honest["protocol"].startswith(f"honest: recorded trace: {SHIPPED}, 48 iterations")
    assert "mean over 43 scored iterations" in honest["protocol"] and honest["trace"] == SHIPPED
    assert honest["setup"] == oracle["setup"] == "2xV100-100G@trace" and honest["experts"] == 4
    assert honest["oracle"] is False and oracle["oracle"] is True and honest["simulated_over_ep"] > 0
    assert honest["simulated_over_ep"] == pytest.approx(honest["steps_s"]["ep"] / honest["steps_s"]["hecate"])
    assert f"recorded trace: {SHIPPED}, 48 iterations" in capsys.readouterr().out


def test_bench_papers_refuses_a_bad_trace_before_any_setup_runs(scripts, tmp_path, capsys):
    bench, _ = scripts
    bad = tmp_path / "short.json"
    RoutingTrace.from_dict(_trace_dict()).save_json(bad)
    for argv in (["--hecate-trace", str(bad)], ["--hecate-setups", "trace-sized"]):
        with pytest.raises(SystemExit):
            bench.main(["--only", "hecate", *argv, "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert "2 rows; expected at least 6" in err and "needs --hecate-trace" in err
    assert not (tmp_path / "x.json").exists()

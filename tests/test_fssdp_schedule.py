"""Hecate's schedule (ds_hexamoe/fssdp/schedule.py) on real gloo ranks: the experts predicted from each
layer's load history are gathered ahead, the rest by calibration gathers, and N ranks still end with
the parameters of one plain PyTorch process, also when routing changes abruptly mid-run (so the
prediction is wrong on purpose: experts used but not predicted, experts predicted but unused)."""
from __future__ import annotations

import pytest

from ds_hexamoe.testing import run_distributed
from test_fssdp import _check_equivalence, _train_worker

S = (2 * 48 * 32 + 32 * 48) * 4  # bytes of one fp32 expert of the test model


def _run(case: dict) -> list[dict]:
    results = run_distributed(_train_worker, case["world"], case, init_process_group=False, timeout=400)
    _check_equivalence(case, results)
    return results


def test_history_prediction_window_budget_and_owned():
    from ds_hexamoe.fssdp.ownership import split_experts
    from ds_hexamoe.fssdp.schedule import LoadHistory

    own = split_experts(4, [0.5, 0.5])  # rank 0 owns 0-1, rank 1 owns 2-3
    h = LoadHistory(window=2)
    assert h.predict(own, None) is None  # no history: nothing is predicted
    h.add([[5, 0, 1, 0], [0, 0, 0, 9]])
    h.add([[0, 0, 0, 4], [0, 3, 0, 0]])
    assert h.predict(own, None) == [[True, False, True, True], [False, True, False, True]]
    # budget 1: rank 0 keeps its most loaded remote expert (3: 4 tokens > 2: 1), owned ones stay
    assert h.predict(own, 1) == [[True, False, False, True], [False, True, False, True]]
    assert h.predict(own, 0) == [[True, False, False, False], [False, False, False, True]]
    h.add([[0, 0, 0, 0], [0, 0, 0, 0]])  # the window slides: the first call falls out
    assert h.predict(own, None) == [[False, False, False, True], [False, True, False, False]]


def test_two_ranks_switch_routing_calibrates_and_stays_exact():
    """Layer 0 sends every token to expert 1 (rank 0's), then from step 3 to expert 6 (rank 1's)."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=2, global_rows=4, lr=3e-3, clip=0.3, steps=5,
                remat=True, prefetch=True, routing={0: ("switch", 1, 6, 3)})
    comm = [[c for c in res["comm"]] for res in _run(case)]
    # the first micro-step has no history: everything moves by calibration (expert 1 to rank 1)
    assert comm[0][0]["calibrate_bytes"] >= S and all(c[0]["calibrations"] > 0 for c in comm)
    assert comm[0][1]["per_expert"][(0, 1)] >= case["gas"] * S  # expert 1 goes to rank 1 every micro-step
    assert comm[0][2]["gather_bytes"] >= case["gas"] * S
    # step 3, first micro-step: expert 6 is used by rank 0 but predicted nowhere -> calibration from rank 1
    assert comm[1][3]["calibrate_bytes"] >= S and comm[1][3]["calibrations"] >= 1
    assert comm[1][4]["gather_bytes"] >= case["gas"] * S  # from then on it is predicted
    for c in comm[0] + comm[1]:
        assert c["exposed_comm_s"] >= 0.0


def test_three_ranks_uneven_kept_weights_switch():
    """3 ranks, shards 2:1:1, weights kept for backward (the predicted gather fills a fresh buffer)."""
    case = dict(world=3, experts=8, top_k=2, micro=1, gas=1, global_rows=3, lr=3e-3, clip=0.3, steps=4,
                remat=False, prefetch=False, shard_weights=[2.0, 1.0, 1.0], routing={0: ("switch", 0, 7, 2)})
    comm = [res["comm"] for res in _run(case)]
    assert sum(c[2]["calibrations"] for c in comm) > 0
    assert sum(c[3]["gather_bytes"] for c in comm) >= 2 * S  # expert 7 predicted for the two non-owners


def test_four_ranks_budget_one_natural_routing():
    """4 ranks, at most one remote expert gathered ahead per rank and layer: natural routing keeps the
    calibration path busy."""
    case = dict(world=4, experts=8, top_k=2, micro=1, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=4,
                remat=True, prefetch=True, budget=1, routing={1: ("switch", 2, 5, 2)})
    comm = [res["comm"] for res in _run(case)]
    assert sum(c[s]["calibrations"] for c in comm for s in range(1, 4)) > 0
    assert sum(c[s]["gather_bytes"] for c in comm for s in range(1, 4)) > 0


def test_auto_budget_follows_measured_window_and_bandwidth():
    from ds_hexamoe.fssdp.budget import LinkMeter, auto_budget

    assert auto_budget(None, 1e9, S, 8) is None and auto_budget(0.01, None, S, 8) is None  # not measured yet
    assert auto_budget(0.01, 10 * S / 0.01, S, 16) == 10  # 10 experts' bytes fit the window
    assert auto_budget(0.02, 10 * S / 0.01, S, 16) == 16  # twice the window: 20, bounded by the cache room
    assert auto_budget(0.01, 2.5 * S / 0.01, S, 16) == 2  # whole experts only
    assert auto_budget(0.0, 1e12, S, 16) == 0
    m = LinkMeter(alpha=0.5)
    m.hidden(0, 0.010)
    m.gathered(4 * S, 0.010)  # a blocked gather: 400 experts/s
    assert m.budget(0, S, 16) == 4
    m.gathered(8 * S, 0.010)  # EMA: (400 + 800) / 2 = 600 experts/s
    assert m.budget(0, S, 16) == 6
    m.gathered(S, 0.010, complete_before=True)  # done before use: only a lower bound (100/s), kept at 600
    assert m.budget(0, S, 16) == 6
    m.gathered(20 * S, 0.010, complete_before=True)  # a faster lower bound raises it to 2000/s
    assert m.budget(0, S, 16) == 16
    m.hidden(0, 0.0)  # the window shrinks (EMA 5 ms): 10 copies
    assert m.budget(0, S, 16) == 10
    assert m.budget(1, S, 16) is None  # layer 1 never had a predicted gather


def test_two_ranks_auto_budget_switch_routing_exact():
    """budget "auto": each rank's measured budget rides along the load exchange; exact whatever it is."""
    case = dict(world=2, experts=8, top_k=2, micro=1, gas=2, global_rows=4, lr=3e-3, clip=0.3, steps=4,
                remat=True, prefetch=True, budget="auto", routing={0: ("switch", 1, 6, 2)})
    results = _run(case)
    budgets = results[0]["budgets"]
    assert budgets and all(b == results[1]["budgets"][k] for k, b in budgets.items())  # every rank agrees
    assert all(isinstance(v, int) and 0 <= v <= 8 for b in budgets.values() for v in b)  # measured, bounded


def test_exposed_comm_reaches_metrics_row_and_progress_bar():
    from ds_hexamoe.worker.metrics import Window, metrics_row, progress_postfix

    w = Window()
    w.add(1.0, 100)
    rtm = {"comm_bytes": 10, "comm": {"exposed_comm_s": 0.25, "total": 10}}
    rec = metrics_row(3, 1.0, float("nan"), 1e-3, w, 1.0, "tokens", None, rtm, 2.0)
    assert rec["exposed_comm_s"] == 0.25
    assert progress_postfix(rec, "tokens")["xcomm"] == "250ms"
    assert "exposed_comm_s" not in metrics_row(3, 1.0, float("nan"), 1e-3, w, 1.0, "tokens", None, {}, 2.0)


def test_fssdp_config_section_is_validated():
    from ds_hexamoe.config import ConfigError, HexaMoEConfig

    cfg = HexaMoEConfig.from_dict({"sharding": "fssdp"})
    assert (cfg.fssdp.schedule, cfg.fssdp.history, cfg.fssdp.budget, cfg.fssdp.reshard_every) == ("hecate", 5, None, 100)
    bad = [({"schedule": "eager"}, r"hexamoe\.fssdp\.schedule: got 'eager'"),
           ({"history": 0}, r"hexamoe\.fssdp\.history: got 0; expected an integer >= 1"),
           ({"budget": -1}, r"hexamoe\.fssdp\.budget"),
           ({"budget": "fast"}, r"hexamoe\.fssdp\.budget: got 'fast'; expected an integer >= 0, \"auto\" or null"),
           ({"reshard_every": -5}, r"hexamoe\.fssdp\.reshard_every"),
           ({"histroy": 3}, r"hexamoe\.fssdp\.histroy: unknown key \(did you mean 'history'\?\)")]
    for section, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            HexaMoEConfig.from_dict({"sharding": "fssdp", "fssdp": section})


def _regather_worker(rank: int, world: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    import ds_hexamoe  # noqa: F401
    from ds_hexamoe.config import HexaMoEConfig
    from ds_hexamoe.fssdp import FSSDPManager
    from test_fssdp import batch, set_routing

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="hexamoe").float()
    set_routing(model, {i: ("hot", 1) for i in range(4)})  # rank 0's expert 1 goes to rank 1 in every layer
    mgr = FSSDPManager.shard_model(model, HexaMoEConfig.from_dict({"sharding": "fssdp"}))
    x = batch(0, rank, 2)
    model(input_ids=x, labels=x).loss.backward()
    return mgr.stats.as_dict()


def test_backward_prefetch_keeps_the_layer_forward_left_in_the_other_slot():
    """4 layers: forward leaves layers 3 and 2 in the two cache slots; backward re-gathers only layers 1 and 0
    (the prefetch of layer 1 must not evict layer 2)."""
    stats = run_distributed(_regather_worker, 2, timeout=300)
    assert stats[0]["regather_bytes"] == 2 * S
    assert stats[1]["regather_bytes"] == 0


def _late_reduce_worker(rank: int, world: int) -> dict:
    from test_fssdp import batch, build_engine, quiet

    quiet()
    import deepspeed

    deepspeed.init_distributed("gloo")
    case = dict(world=world, experts=8, top_k=2, micro=1, gas=2, global_rows=2, lr=3e-3, clip=0.3,
                routing={0: ("hot", 1)})
    engine, manager = build_engine(case)
    seen = []
    for m in range(2):
        x = batch(0, m, 2)[rank:rank + 1]
        engine.backward(engine(input_ids=x, labels=x).loss)
        seen.append(manager.pending_reduces)  # reduces still in flight after DeepSpeed's backward
        engine.step()
        seen.append(manager.pending_reduces)
    return {"seen": seen}


def test_gradient_reduces_are_waited_at_the_optimizer_step():
    """Attached to an engine, async reduce-scatters outlive engine.backward() (they overlap DeepSpeed's
    end-of-backward work) and engine.step() finishes them before reading the gradients; exactness with
    accumulation is the other tests' (gas=2, prefetch on)."""
    for res in run_distributed(_late_reduce_worker, 2, init_process_group=False, timeout=300):
        assert res["seen"][0] > 0 and res["seen"][2] > 0
        assert res["seen"][1] == 0 and res["seen"][3] == 0


def test_covered_prediction_defers_the_load_exchange_and_stays_exact():
    """Natural routing: once every rank's window holds every expert, no calibration can be needed, so the
    layer's load exchange runs asynchronously (read by the next prediction and by backward's re-gather and
    reduce) instead of blocking the forward. 2 ranks with accumulation; 3 ranks, uneven shards, weights kept."""
    for case in (dict(world=2, experts=8, top_k=2, micro=2, gas=2, global_rows=4, lr=3e-3, clip=0.3, steps=4,
                      remat=True, prefetch=True),
                 dict(world=3, experts=8, top_k=2, micro=1, gas=1, global_rows=3, lr=3e-3, clip=0.3, steps=4,
                      remat=False, prefetch=False, shard_weights=[2.0, 1.0, 1.0])):
        comm = [res["comm"] for res in _run(case)]
        assert all(sum(s["loads_deferred"] for s in c) > 0 for c in comm), [[s["loads_deferred"] for s in c] for c in comm]

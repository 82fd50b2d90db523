"""Heterogeneous runtime: the plan's uneven batch shares and FSSDP shard weights through
``ds_hexamoe.initialize``, exact against one plain PyTorch process on the union of the batches, with a
re-plan that migrates shards mid-training; the slowdown emulation; bad inputs failing before work."""
from __future__ import annotations

import json

import pytest
import torch

from ds_hexamoe.config import ConfigError
from ds_hexamoe.hetero import ShareSampler, count_tokens, loss_scale, share_bounds, split_batch
from ds_hexamoe.hetero.profiling import measured_at as _measured_at
from ds_hexamoe.testing import run_distributed

VOCAB, SEQ, GLOBAL, STEPS, LR = 64, 8, 8, 4, 1e-2
FAST = {"name": "cpu-fast", "tflops": 1.0, "memory_gb": 8, "bandwidth_gbps": 1000}
SLOW = dict(FAST, name="cpu-slow", slowdown=3.0)


def make_model(impl: str = "hexamoe"):
    import ds_hexamoe  # noqa: F401  (registers the "hexamoe" experts implementation)
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                        num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).float()


def global_batch(step: int):
    """Ids and labels of one global micro-batch; about a third of the labels are -100, unevenly per row,
    so token counts (not row counts) decide the loss weights."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ), generator=g)
    labels = ids.clone()
    labels[torch.rand(GLOBAL, SEQ, generator=g) < torch.linspace(0.0, 0.7, GLOBAL)[:, None]] = -100
    return ids, labels


def ds_config(hexamoe: dict) -> dict:
    return {
        "train_micro_batch_size_per_gpu": GLOBAL // 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "hexamoe": {"kernels": "torch", **hexamoe},
    }


def _worker(rank, world, hexamoe, replan_at, new_devices):
    import deepspeed

    import ds_hexamoe

    deepspeed.init_distributed("gloo")
    engine, *_ = ds_hexamoe.initialize(model=make_model(), config=ds_config(hexamoe))
    rt = engine.hexamoe
    hetero = rt.hetero
    out = {"plan_shares": list(rt.plan.batch_shares), "shares": [], "owned": [], "migrations": []}
    fssdp = rt.fssdp
    for step in range(STEPS):
        if step == replan_at:
            rt.replan(profiles=new_devices)
            out["migrations"].append(hetero.history[-1].get("migration"))
        ids, labels = global_batch(step)
        x, y = split_batch(ids, hetero, rank), split_batch(labels, hetero, rank)
        out["shares"].append(list(hetero.batch_shares))
        if fssdp is not None:
            out["owned"].append([layer.local_count for layer in fssdp.layers])
        loss = engine(input_ids=x, labels=y).loss
        engine.backward(loss * loss_scale(count_tokens(y), count_tokens(labels), world))
        engine.step()
        rt.after_step(engine.global_steps)
    out["history"] = hetero.history
    out["step_times"] = hetero.step_times
    out["state"] = (fssdp.full_state_dict() if fssdp is not None else
                    {k: v.detach().clone() for k, v in engine.module.state_dict().items()})
    return out


def reference(steps: int = STEPS) -> dict:
    """One plain PyTorch process, the whole global batch per step (mean loss over its labelled tokens)."""
    from ds_hexamoe.integrations.deepspeed import build_param_groups

    model = make_model("eager")
    opt = torch.optim.AdamW(build_param_groups(model, ds_config({})), lr=LR, betas=(0.9, 0.99), eps=1e-8)
    for step in range(steps):
        ids, labels = global_batch(step)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_matches(state: dict, ref: dict) -> None:
    init = make_model("eager").state_dict()
    assert set(state) == set(ref)
    moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
    assert moved > 2e-2, "the reference barely trained: the comparison could not fail"
    for k in ref:
        # fp32 Adam: rounding in near-zero gradients gives ~1e-5; a wrong loss weight moves by ~lr
        torch.testing.assert_close(state[k], ref[k], rtol=1e-3, atol=2e-4, msg=f"{k} differs after {STEPS} steps")


# ------------------------------------------------------------------------------------ 2 gloo ranks
def test_declared_slow_rank_gets_a_quarter_and_uneven_shares_are_exact():
    """Rank 1 declared 3x slower: the plan through initialize gives it 2 of 8 samples; ZeRO-2 with those
    uneven micro-batches ends with the parameters of one process; the runtime sleeps on rank 1 only;
    re-planning every 2 steps from the routing window keeps the shares."""
    hexamoe = {"profile": "declared", "devices": [FAST, SLOW], "placement": {"replan_every": 2}}
    results = run_distributed(_worker, 2, hexamoe, -1, None, init_process_group=False, timeout=300)
    ref = reference()
    for r, res in enumerate(results):
        assert res["plan_shares"] == [6, 2], res["plan_shares"]
        assert all(s == [6, 2] for s in res["shares"])
        assert [h["step"] for h in res["history"]] == [0, 2, 4]
        assert res["history"][1]["stats"].startswith("window")
        _assert_matches(res["state"], ref)
    slept = [sum(t["slept_s"] for t in res["step_times"]) for res in results]
    busy = [sum(t["busy_s"] for t in res["step_times"]) for res in results]
    assert slept[0] == 0.0 and slept[1] > 0.0
    # rank 1 sleeps twice its own work: its emulated busy time is 3x its real work
    assert busy[1] == pytest.approx(3 * (busy[1] - slept[1]), rel=1e-6)


def test_fssdp_plan_shards_and_replan_migration_are_exact():
    """FSSDP with the plan's speed-proportional shard weights (rank 0 owns 6 of 8 experts per layer); at
    step 2 rank 0 becomes the 3x slower device: shares flip to [2, 6] and the shards migrate with their
    Adam state (dropping it would change the next updates by ~lr); parameters still equal one process."""
    hexamoe = {"profile": "declared", "devices": [FAST, SLOW], "sharding": "fssdp"}
    results = run_distributed(_worker, 2, hexamoe, 2, [SLOW, FAST], init_process_group=False, timeout=300)
    ref = reference()
    r0, r1 = results
    assert r0["shares"] == [[6, 2], [6, 2], [2, 6], [2, 6]]
    assert r0["owned"][0] == [6, 6] and r1["owned"][0] == [2, 2]
    assert r0["owned"][2] == [2, 2] and r1["owned"][2] == [6, 6]
    mig = r0["migrations"][0]
    assert mig["moved_experts"] == 8 and mig["counts"]["model.layers.0.mlp.experts"] == [2, 6]
    assert mig["bytes_sent"] > 0
    _assert_matches(r0["state"], ref)


# --------------------------------------------------------------------------------- single process
def test_split_batch_loss_scale_and_sampler():
    ids, labels = global_batch(0)
    shares = [5, 3]
    parts = [split_batch(ids, shares, r) for r in range(2)]
    assert torch.equal(torch.cat(parts), ids) and [p.size(0) for p in parts] == shares
    d = split_batch({"input_ids": ids, "labels": labels, "note": "x"}, shares, 1)
    assert torch.equal(d["labels"], labels[5:]) and d["note"] == "x"
    n = [count_tokens(split_batch(labels, shares, r)) for r in range(2)]
    N = count_tokens(labels)
    assert sum(n) == N == int((labels[:, 1:] != -100).sum())
    # the scaled per-rank means, averaged with equal weights, are the mean over the union
    model = make_model("eager")
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels).loss
        per = [model(input_ids=split_batch(ids, shares, r), labels=split_batch(labels, shares, r)).loss for r in range(2)]
    mixed = sum(l * loss_scale(n[r], N, 2) for r, l in enumerate(per)) / 2
    assert float(mixed) == pytest.approx(float(full), rel=1e-6)
    assert float(sum(per) / 2) != pytest.approx(float(full), rel=1e-3)  # unscaled averaging is wrong here
    with pytest.raises(ValueError, match="rows but the shares"):
        split_batch(ids, [4, 3], 0)
    with pytest.raises(ValueError, match="global_tokens=0"):
        loss_scale(0, 0, 2)
    # the sampler: ranks' batches tile each global batch; shares read at every batch
    class Holder:
        batch_shares = [3, 1]

    h = Holder()
    samplers = [ShareSampler(20, h, r, seed=1) for r in range(2)]
    its = [iter(s) for s in samplers]
    first = [next(it) for it in its]
    assert [len(b) for b in first] == [3, 1]
    h.batch_shares = [1, 3]
    second = [next(it) for it in its]
    assert [len(b) for b in second] == [1, 3]
    seen = first[0] + first[1] + second[0] + second[1]
    assert len(set(seen)) == 8
    assert share_bounds([3, 1], 1) == (3, 4)


def _memory_for(room_experts: float) -> float:
    """GB of one rank's memory leaving ``room_experts`` materialized experts (with gradients) of free room
    after the dense state and every expert's shard (the planner's accounting, see placement/costs.py)."""
    from ds_hexamoe.hetero import model_shape_for
    from ds_hexamoe.placement.costs import CostModel, PlanOptions
    from ds_hexamoe.placement.profiles import load_profiles
    from ds_hexamoe.experts.stats import uniform_stats

    shape = model_shape_for(make_model())
    names = [f"model.layers.{i}.mlp.experts" for i in range(2)]
    cost = CostModel(load_profiles([FAST]), uniform_stats(names, 8, 64, 2), shape, 4, PlanOptions(memory_fraction=1.0))
    need = cost.dense_state()[0] + cost.expert_state_total() + room_experts * cost.cache_unit
    return need / 0.9 / 1e9  # the planner uses 90% of a device's memory


def test_bad_inputs_fail_before_any_work(one_rank_group, tmp_path):
    import ds_hexamoe

    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def init(hexamoe):
        cfg = ds_config(hexamoe)
        cfg["train_micro_batch_size_per_gpu"] = 4
        return ds_hexamoe.initialize(model=model, config=cfg)

    # memory too small for the model state
    with pytest.raises(ConfigError, match=r"hexamoe\.devices .*total memory is too small"):
        init({"profile": "declared", "devices": [dict(FAST, memory_gb=_memory_for(-10.0))], "sharding": "fssdp"})
    # the state fits, but no device has room for one double-buffered expert with its gradient
    with pytest.raises(ConfigError, match=r"hexamoe\.devices .*one expert with its gradient needs"):
        init({"profile": "declared", "devices": [dict(FAST, memory_gb=_memory_for(1.0))], "sharding": "fssdp"})
    # wrong number of entries
    with pytest.raises(ConfigError, match=r"hexamoe\.devices: got 2 device profiles for WORLD_SIZE=1"):
        init({"profile": "declared", "devices": [FAST, FAST]})
    # malformed devices files: bad JSON, a bad field, an unknown key, a missing number
    cases = [("{not json", r"hexamoe\.devices_file .*invalid JSON"),
             (json.dumps({"devices": [dict(FAST, tflops=-1)]}), r"hexamoe\.devices_file .*devices\[0\]\.tflops: got -1"),
             (json.dumps({"devices": [dict(FAST, speed=2)]}), r"hexamoe\.devices_file .*devices\[0\]\.speed: unknown key"),
             (json.dumps({"devices": [{"name": "mystery", "memory_gb": 8, "bandwidth_gbps": 1}]}),
              r"devices\[0\]\.tflops: missing"),
             (json.dumps({"devices": [dict(FAST, count=2)]}), r"got 2 device profiles for WORLD_SIZE=1")]
    for i, (text, pattern) in enumerate(cases):
        path = tmp_path / f"devices{i}.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            init({"profile": "declared", "devices_file": str(path)})
    # an inline entry with a bad value is caught by the config parser, naming the key
    with pytest.raises(ConfigError, match=r"hexamoe\.devices\[0\]\.slowdown"):
        init({"profile": "declared", "devices": [dict(FAST, slowdown=0.5)]})
    # nothing was converted or sharded by the failed calls
    assert model.config._experts_implementation == "hexamoe"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from ds_hexamoe.fssdp import is_shard
    assert not any(is_shard(p) for p in model.parameters())
    # room for the expert cache but not for the activations of the batch
    with pytest.raises(ConfigError, match=r"hexamoe\.devices .*global_batch: got 4; the ranks' memory holds at most 1"):
        init({"profile": "declared", "devices": [dict(FAST, memory_gb=_memory_for(18.0))]})
    assert model.config._experts_implementation == "hexamoe"
    # and a feasible declared plan on one rank works
    ok = ds_hexamoe.hetero.PlanState.from_config(
        model, ds_hexamoe.config.HexaMoEConfig.from_dict({"profile": "declared", "devices": [FAST]}),
        {"train_micro_batch_size_per_gpu": 4})
    assert ok.batch_shares == [4] and ok.shard_weights == [1.0]


def _clock_worker(rank, world):
    import time

    import torch.distributed as dist

    from ds_hexamoe.hetero import CollectiveClock

    clock = CollectiveClock(3.0 if rank == 1 else 1.0).install()
    try:
        t = torch.ones(4)
        dist.barrier()
        clock.lap()
        if rank == 0:
            time.sleep(0.4)  # the fast peer is late: the slow rank waits on its async handle
            dist.all_reduce(t)
        else:
            work = dist.all_reduce(t, async_op=True)
            work.wait()
        lap = clock.lap()
    finally:
        clock.uninstall()
    return {"lap": lap, "sum": float(t[0])}


def test_slowdown_clock_counts_async_waits_as_collective_time():
    """Waiting on an async collective is not work: the emulated 3x rank must not sleep 2x the 0.4 s it
    spent waiting for its peer (it did before handles were wrapped), and the wait shows up as comm."""
    r0, r1 = run_distributed(_clock_worker, 2, timeout=120)
    assert r0["sum"] == r1["sum"] == 2.0
    assert r1["lap"]["comm_s"] > 0.3, r1["lap"]
    assert r1["lap"]["slept_s"] < 0.1, r1["lap"]
    assert r1["lap"]["collectives"] == 1


def measured_at(name: str) -> dict:
    """The job shape a measured profile's name records (without the sizes timed instead)."""
    return {k: v for k, v in _measured_at(name).items() if not k.startswith("timed_")}


def _measure_worker(rank, world):
    import deepspeed

    import ds_hexamoe
    from ds_hexamoe.hetero import count_tokens, loss_scale, split_batch

    deepspeed.init_distributed("gloo")
    # measured speeds on identical CPU ranks; rank 1 declares a 3x slowdown and a link latency
    hexamoe = {"profile": "measure", "devices": [{"name": "cpu"}, {"name": "cpu", "slowdown": 3.0, "latency_us": 500.0}]}
    engine, *_ = ds_hexamoe.initialize(model=make_model(), config=ds_config(hexamoe))
    rt = engine.hexamoe
    h = rt.hetero
    out = {"profiles": [p.to_dict() for p in h.profiles], "shares": list(h.batch_shares),
           "sync": h.plan.predicted["sync_time"]}
    # the data is shorter than the model's 8 positions, and longer on rank 1: step 1 measures at 6
    ids, labels = (t[:, :5 + rank] for t in global_batch(0))
    x, y = split_batch(ids, h, rank), split_batch(labels, h, rank)
    engine.backward(engine(input_ids=x, labels=y).loss * loss_scale(count_tokens(y), count_tokens(labels), world))
    engine.step()
    rt.after_step(engine.global_steps)
    out["after"] = [p.to_dict() for p in h.profiles]
    out["history"] = [r["step"] for r in h.history]
    return out


def test_measured_profiles_with_declared_overrides():
    """``"profile": "measure"``: every rank times its own matmuls, copy bandwidth and the group's
    collective latency, the profiles are all-gathered (the same list on every rank), declared fields win
    (rank 1's slowdown and latency), and the plan gives the 3x rank about a quarter of the batch."""
    r0, r1 = run_distributed(_measure_worker, 2, init_process_group=False, timeout=300)
    assert r0["profiles"] == r1["profiles"] and r0["shares"] == r1["shares"]
    p0, p1 = r0["profiles"]
    assert p0["slowdown"] == 1.0 and p1["slowdown"] == 3.0
    assert p0["expert_tflops"] > 0 and p0["memory_bandwidth_gbps"] > 0
    assert 0 < p0["latency_us"] < 1e5 and p1["latency_us"] == 500.0
    assert r0["shares"][1] in (1, 2, 3) and sum(r0["shares"]) == GLOBAL  # a quarter of 8 is 2
    assert r0["sync"] > 0
    # timed at the model's shapes and ranks' mean micro-batch; after step 1 at the data's longest sequence
    job = {"hidden": 32, "ffn": 48, "experts": 8, "top_k": 2, "heads": 4}
    assert [measured_at(p["name"]) for p in r0["profiles"]] == [{**job, "seq": SEQ, "tokens": 4 * SEQ}] * 2
    assert r0["after"] == r1["after"] and r0["history"] == r1["history"] == [0, 1]
    assert [measured_at(p["name"]) for p in r0["after"]] == [{**job, "seq": 6, "tokens": 4 * 6}] * 2
    assert r0["after"][1]["slowdown"] == 3.0 and r0["after"][1]["latency_us"] == 500.0  # declared still wins


def test_measure_waits_for_the_datas_sequence_length():
    """One process: the first profiles are timed at the model's shapes (its 8 positions); the first batch
    is 5 tokens long, so after step 1 the controller measures again at 5 and re-plans with those."""
    from ds_hexamoe.config import HexaMoEConfig
    from ds_hexamoe.hetero import PlanState
    from ds_hexamoe.runtime import HexaMoERuntime

    model = make_model()
    cfg = HexaMoEConfig.from_dict({"profile": "measure"})
    state = PlanState.from_config(model, cfg, {"train_micro_batch_size_per_gpu": 4})
    first = measured_at(state.profiles[0].name)
    assert first == {"hidden": 32, "ffn": 48, "experts": 8, "top_k": 2, "heads": 4, "seq": SEQ, "tokens": 4 * SEQ}
    rt = HexaMoERuntime(model, cfg, planning=state)
    ctl = rt.hetero
    assert rt.plan is state.plan is ctl.plan
    model(input_ids=global_batch(0)[0][:4, :5])
    rt.after_step(1)
    assert measured_at(ctl.profiles[0].name) == {**first, "seq": 5, "tokens": 4 * 5}
    assert ctl.shape.seq_len == 5 and [r["step"] for r in ctl.history] == [0, 1]
    assert ctl.history[1]["devices"][0]["name"] == ctl.profiles[0].name
    model(input_ids=global_batch(1)[0][:4, :7])
    rt.after_step(2)  # measured once, at the first batch: no more re-plans
    assert len(ctl.history) == 2 and ctl._seq_hook is None

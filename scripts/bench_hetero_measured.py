"""The measured part of ``bench_hetero.py`` (``--measured``, ``--measured-only``): a small Mixtral trained on 2
(or more) gloo CPU ranks, one emulated slower by the runtime, alternating blocks of steps with the uniform
plan and the planner's in one process group, against the ideal bound and the simulator's predictions
(``"measured_cpu"`` in bench_hetero's JSON).

Imported by name from ``scripts/`` (the spawned gloo ranks unpickle its worker functions by module name).
"""
from __future__ import annotations

import statistics

import numpy as np

from bench_common import Col, Laps, Table, calibrate_link
from ds_hexamoe.config import ConfigError

# max_position_embeddings is the sequence length trained: the runtime plans for it until routing
# statistics tell it the real one
SEQ = 128
BENCH_MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=SEQ, num_local_experts=8, num_experts_per_tok=2,
                   router_jitter_noise=0.0)


def _bench_model():
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    import ds_hexamoe  # noqa: F401

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MixtralConfig(**BENCH_MODEL), experts_implementation="hexamoe").float()


def _bench_batch(step: int, rows: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(step)
    return torch.randint(0, BENCH_MODEL["vocab_size"], (rows, seq), generator=g)


def _ds_config(micro: int, hexamoe: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**9, "hexamoe": hexamoe}


def _fit(sizes, times) -> dict:
    """``time = fixed + per_sample * b`` through two (batch size, seconds) points. On a loaded machine the
    larger batch can time faster than the smaller one; the slope is then noise, and the rate falls back
    to the larger point's seconds per sample with no fixed part (a negative rate would be no device)."""
    per_sample = (times[1] - times[0]) / (sizes[1] - sizes[0])
    fixed = max(0.0, times[0] - per_sample * sizes[0])
    if per_sample <= 0:
        per_sample, fixed = times[1] / sizes[1], 0.0
    return {"per_sample_s": per_sample, "fixed_s": fixed, "sizes": list(sizes), "times_s": list(times)}


def _calib_worker(rank, world, seq, sizes, repeats):

    import deepspeed

    import ds_hexamoe

    deepspeed.init_distributed("gloo")
    times = []
    for b in sizes:
        cfg = _ds_config(b, {"kernels": "torch", "sharding": "fssdp"})
        engine, *_ = ds_hexamoe.initialize(model=_bench_model(), config=cfg)
        walls = Laps()
        for i in range(repeats + 2):
            x = _bench_batch(i, b, seq)
            with walls.lap(keep=i >= 2):
                engine.backward(engine(input_ids=x, labels=x).loss)
                engine.step()
        times.append(walls.median())
    return times


def calibrate(seq: int, sizes=(4, 24), repeats: int = 5) -> dict:
    """Seconds per sample and per step (fixed) of one unslowed rank: the same DeepSpeed + ds-hexamoe engine
    the measured runs use, alone on one gloo rank with one thread; a line through the median step times
    at two batch sizes. The fixed part (optimizer step, engine overhead) is declared as the profiles'
    ``step_overhead_s``, which a slowed rank pays ``slowdown`` times like its compute."""
    from ds_hexamoe.testing import run_distributed

    (times,) = run_distributed(_calib_worker, 1, seq, sizes, repeats, init_process_group=False, timeout=600)
    return _fit(sizes, times)


class _Blocks:
    """Blocks of training steps on one rank's engine, each under a given plan (batch shares, shard weights):
    the seconds of every step and the runtime's lap of it (busy / in collectives / slept)."""

    def __init__(self, engine, rank: int, world: int, seq: int, warmup: int):
        self.engine, self.rank, self.world, self.seq, self.warmup = engine, rank, world, seq, warmup
        self.rt = engine.hexamoe
        self.h = self.rt.hetero
        self.clock = self.h.clock
        self.step = 0

    def run(self, shares, weights, n: int):
        import torch

        from ds_hexamoe.fssdp.migrate import migrate_shards
        from ds_hexamoe.hetero import count_tokens, loss_scale, split_batch

        engine, h = self.engine, self.h
        h.state.batch_shares = list(shares)  # a candidate plan measured in place of the planned one (PlanState owns shares)
        if self.rt.fssdp is not None:
            migrate_shards(self.rt.fssdp, weights)
        walls, laps = Laps(), []
        for i in range(self.warmup + n):
            ids = _bench_batch(1000 + self.step, sum(shares), self.seq)
            self.step += 1
            x = split_batch(ids, h, self.rank)
            torch.distributed.barrier()
            self.clock.lap()
            with walls.lap(keep=i >= self.warmup):
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss * loss_scale(count_tokens(x), count_tokens(ids), self.world))
                engine.step()
                self.rt.after_step(engine.global_steps)
            if i >= self.warmup:
                laps.append(h.step_times[-1])
        return walls.s, laps

    def busy_per_rank(self, shares, weights, steps: int) -> list[float]:
        """Every rank's median busy seconds per step over a block of ``2 * steps`` (every plan's prediction
        rests on these)."""
        import torch

        _, laps = self.run(shares, weights, 2 * steps)
        t = torch.zeros(self.world, dtype=torch.float64)
        t[self.rank] = statistics.median(lp["busy_s"] for lp in laps)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _calibrate_in_run(blocks: _Blocks, hexamoe, steps, cal_sizes, flops_per_sample, update_bytes):
    """Every rank unslowed with equal shares: each rank's work outside collectives fitted as
    ``fixed + per_sample * b + shard * w`` from even shards at two batch sizes and uneven shards at one (so
    FSSDP's host work, the sharded optimizer and two ranks sharing the machine are in it). Returns the fit
    and the devices declared from it."""
    import torch

    world, clock = blocks.world, blocks.clock
    even = [1.0 / world] * world
    spread = [float(w) for w in torch.linspace(1.5, 0.5, world) / world]  # uneven shards, same hardware
    slow, clock.slowdown = clock.slowdown, 1.0
    busy = [statistics.mean(blocks.busy_per_rank([b] * world, even, steps)) for b in cal_sizes]
    # the owner's share of the work: optimizer step and packing over its experts, linear in its shard
    uneven = blocks.busy_per_rank([cal_sizes[-1]] * world, spread, steps)
    clock.slowdown = slow
    cal2 = _fit(cal_sizes, busy)
    per_shard = max(1e-6, float(np.polyfit(spread, uneven, 1)[0]))  # seconds per step owning every expert
    cal2.update(shard_s=per_shard, fixed_s=max(0.0, cal2["fixed_s"] - per_shard / world), uneven_busy_s=uneven,
                uneven_shards=spread)
    # declared as the effective memory bandwidth of that work: the model's expert-update bytes per second
    cal2["memory_bandwidth_gbps"] = update_bytes / per_shard / 1e9
    devices = [dict(d, tflops=flops_per_sample / cal2["per_sample_s"] / 1e12, step_overhead_s=cal2["fixed_s"],
                    memory_bandwidth_gbps=cal2["memory_bandwidth_gbps"]) for d in hexamoe["devices"]]
    return cal2, devices


def _bench_worker(rank, world, hexamoe, micro, seq, rounds, steps, warmup, cal_sizes, slowdowns, flops_per_sample,
                  update_bytes):
    """In one process group: (1) calibration, every rank unslowed with equal shares (``_calibrate_in_run``);
    (2) a re-plan with the devices declared from that fit (shards migrate); (3) alternating blocks of steps
    with the uniform plan and the planner's, the order flipping every round so drift on a noisy machine
    hits both alike."""
    import deepspeed

    import ds_hexamoe

    deepspeed.init_distributed("gloo")
    engine, *_ = ds_hexamoe.initialize(model=_bench_model(), config=_ds_config(micro, hexamoe))
    blocks = _Blocks(engine, rank, world, seq, warmup)
    rt, h = blocks.rt, blocks.h
    cal2, devices = _calibrate_in_run(blocks, hexamoe, steps, cal_sizes, flops_per_sample, update_bytes)
    # the calibration's batches are not the training batch: leave them out of the routing window (the
    # re-plan reads the sequence length from tokens per forward)
    h.window_stats()
    h.replan(profiles=devices, step=engine.global_steps)
    plans = {"uniform": ([micro] * world, [1.0 / world] * world),
             "planned": (list(h.batch_shares), list(h.shard_weights))}
    out = {n: {"walls": [], "laps": [], "owned": None} for n in plans}
    for rnd in range(rounds):
        for name in (("uniform", "planned") if rnd % 2 == 0 else ("planned", "uniform")):
            walls, laps = blocks.run(*plans[name], steps)
            out[name]["walls"] += walls
            out[name]["laps"] += laps
            if rt.fssdp is not None:
                out[name]["owned"] = [layer.local_count for layer in rt.fssdp.layers]
    pred = h.plan.predicted
    return {"runs": out, "plans": {n: {"shares": s, "shard_weights": w} for n, (s, w) in plans.items()},
            "calibration_2rank": cal2, "devices": devices,
            "predicted": {k: v for k, v in pred.items() if not isinstance(v, (dict, list))},
            "per_rank_busy": pred["per_rank"]["busy"], "uniform_busy": pred["uniform_per_rank"]["busy"]}


def _ideal(cal: dict, G: int, slowdowns) -> float:
    """The work of one step (``G`` samples, each rank's fixed per-step cost, one optimizer step over all
    experts) over the ranks' summed speed (valid while no rank's overhead alone exceeds it, as here)."""
    work = G * cal["per_sample_s"] + len(slowdowns) * cal["fixed_s"] + cal.get("shard_s", 0.0)
    return work / sum(1.0 / s for s in slowdowns)


def measured_cpu(world_size: int = 2, slowdowns: tuple[float, ...] = (1.0, 3.0), micro: int = 16, seq: int = SEQ,
                 rounds: int = 5, steps: int = 4, warmup: int = 1, fssdp: bool = True) -> dict:
    """Train the bench Mixtral on ``world_size`` gloo CPU ranks, rank ``r`` emulated ``slowdowns[r]`` times
    slower by the runtime (it sleeps ``(s - 1) x`` its own work before each collective). The devices are
    declared from a one-rank calibration of the engine (``calibrate``), then re-planned in the run from a
    calibration on all ranks unslowed; then alternating blocks of the uniform plan (equal shares, even
    shards) and the planner's. Reports the median measured step time of each plan, the ideal bound (work
    measured on all ranks, over summed speed; also from the one-rank calibration) and the simulator's
    prediction for both."""
    from ds_hexamoe.hetero import model_shape_for
    from ds_hexamoe.testing import run_distributed

    if len(slowdowns) != world_size:
        raise ConfigError(f"--slowdowns: got {len(slowdowns)} factors for {world_size} ranks; give one per rank")
    cal = calibrate(seq)
    link = calibrate_link(world_size)
    shape = model_shape_for(_bench_model(), seq_len=seq)
    k = BENCH_MODEL["num_experts_per_tok"]
    flops_per_sample = seq * (shape.dense_flops_per_token + shape.num_moe_layers * k * shape.pair_flops)
    tflops = flops_per_sample / cal["per_sample_s"] / 1e12
    devices = [{"name": f"cpu-x{s:g}", "tflops": tflops, "memory_gb": 4.0, "bandwidth_gbps": link["bandwidth_gbps"],
                "latency_us": link["latency_us"], "slowdown": s, "step_overhead_s": cal["fixed_s"]} for s in slowdowns]
    hexamoe = {"kernels": "torch", "profile": "declared", "devices": devices}
    if fssdp:
        hexamoe["sharding"] = "fssdp"
    res = run_distributed(_bench_worker, world_size, hexamoe, micro, seq, rounds, steps, warmup, (4, 24), slowdowns,
                          flops_per_sample, shape.expert_update_bytes, init_process_group=False, timeout=900)
    pred = res[0]["predicted"]
    runs = {}
    for name in ("uniform", "planned"):
        n = len(res[0]["runs"][name]["walls"])
        walls = [max(r["runs"][name]["walls"][i] for r in res) for i in range(n)]
        laps = [r["runs"][name]["laps"] for r in res]
        runs[name] = {"measured_s": statistics.median(walls), "walls_s": walls, **res[0]["plans"][name],
                      "experts_owned": [r["runs"][name]["owned"] for r in res],
                      "busy_s": [statistics.median(t["busy_s"] for t in lp) for lp in laps],
                      "comm_s": [statistics.median(t["comm_s"] for t in lp) for lp in laps],
                      "predicted_s": pred["uniform_step_time"] if name == "uniform" else pred["step_time"]}
    runs["ideal_predicted_s"] = pred["ideal_step_time"]
    G = micro * world_size
    cal2 = res[0]["calibration_2rank"]
    out = {"world_size": world_size, "slowdowns": list(slowdowns), "global_batch": G, "seq_len": seq, "fssdp": fssdp,
           "rounds": rounds, "steps_per_block": steps, "calibration": cal, "calibration_all_ranks": cal2, "link": link,
           "declared_tflops": flops_per_sample / cal2["per_sample_s"] / 1e12, "devices": res[0]["devices"],
           "ideal_s": _ideal(cal2, G, slowdowns), "ideal_one_rank_s": _ideal(cal, G, slowdowns), **runs}
    p = runs["planned"]
    out["planned_vs_ideal"] = out["ideal_s"] / p["measured_s"]
    out["planned_vs_ideal_one_rank"] = out["ideal_one_rank_s"] / p["measured_s"]
    out["prediction_error"] = {n: runs[n]["predicted_s"] / runs[n]["measured_s"] - 1 for n in ("uniform", "planned")}
    out["speedup_vs_uniform"] = runs["uniform"]["measured_s"] / p["measured_s"]
    out["goals"] = {"within_10pct_of_ideal": out["planned_vs_ideal"] >= 1 / 1.1,
                    "prediction_within_15pct": all(abs(e) <= 0.15 for e in out["prediction_error"].values())}
    return out


def print_measured(m: dict) -> None:
    print(f"\nmeasured on {m['world_size']} CPU ranks (slowdowns {m['slowdowns']}, global batch {m['global_batch']} x "
          f"{m['seq_len']} tokens, FSSDP {m['fssdp']}); calibrated on all ranks {m['declared_tflops'] * 1e3:.2f} GFLOP/s, "
          f"{m['calibration_all_ranks']['per_sample_s'] * 1e3:.1f} ms/sample + "
          f"{m['calibration_all_ranks']['fixed_s'] * 1e3:.1f} ms/step + {m['calibration_all_ranks']['shard_s'] * 1e3:.1f} "
          f"ms x shard (one rank alone: "
          f"{m['calibration']['per_sample_s'] * 1e3:.1f} + {m['calibration']['fixed_s'] * 1e3:.1f}); "
          f"link {m['link']['latency_us']:.0f} us/collective, {m['link']['bandwidth_gbps']:.2f} GB/s")
    t = Table(Col("plan", "<10"), Col("shares", ">12"), Col("shards", ">16"), Col("measured s", ">12.3f"),
              Col("predicted s", ">13.3f"), Col("pred err", ">9.1f", "%"), Col("busy s/rank", ">22"))
    print(t.rule())
    for n in ("uniform", "planned"):
        r = m[n]
        sw = "/".join(f"{w:.2f}" for w in r["shard_weights"])
        busy = "/".join(f"{b:.3f}" for b in r["busy_s"])
        print(t.row(n, str(r["shares"]), sw, r["measured_s"], r["predicted_s"], 100 * m["prediction_error"][n], busy))
    print(t.row("ideal", "", "", m["ideal_s"], m["ideal_predicted_s"])
          + f"   (work / summed speed; {m['ideal_one_rank_s']:.3f} s from the one-rank calibration)")
    print(f"planned: x{m['speedup_vs_uniform']:.2f} vs uniform, {100 * m['planned_vs_ideal']:.0f}% of ideal; goals: "
          f"within 10% of ideal {'met' if m['goals']['within_10pct_of_ideal'] else 'NOT met'}, prediction within 15% "
          f"{'met' if m['goals']['prediction_within_15pct'] else 'NOT met'}")



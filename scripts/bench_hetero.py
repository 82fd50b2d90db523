"""Heterogeneous placement at cluster scale, simulated: planner wall time per solver and the predicted
speed-up over the uniform plan (and the distance to the ideal), for Mixtral 8x7B and Qwen3-30B-A3B on
64-1024 ranks of mixed GPU generations. Prints a table and writes JSON.

    python scripts/bench_hetero.py [--ranks 64 256 1024] [--models mixtral-8x7b qwen3-30b-a3b]
                                   [--solvers greedy eplb ilp] [--time-limit 20] [--out bench_hetero.json]

The ILP is skipped where one layer's problem exceeds --ilp-max-binaries (the MILP build alone would
dominate). ``--measured`` (or ``--measured-only``) adds the measured part: ``measured_cpu`` trains a small
Mixtral on 2 (or more) gloo CPU ranks, one emulated slower by the runtime, alternating blocks of steps
with the uniform plan and the planner's in one process group, against the ideal bound and the simulator's predictions (``"measured_cpu"`` in the JSON).
``--validate --world N --json F`` checks the simulator against the runtime per execution mode
(scripts/bench_validate.py); ``--zebra ...`` runs scripts/bench_zebra.py.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import statistics
import time

import numpy as np

from ds_hexamoe.config import ConfigError
from ds_hexamoe.placement.shapes import MODEL_SHAPES
from ds_hexamoe.placement.planner import plan
from ds_hexamoe.placement.profiles import load_profiles
from ds_hexamoe.experts.stats import synthetic_stats

# mixed generations: shares of the cluster per device kind
CLUSTERS = {
    "h100+a100+v100": [("H100-SXM", 0.5), ("A100-80GB", 0.25), ("V100-32GB", 0.25)],
    "h100+a40+l40s": [("H100-SXM", 0.25), ("A40", 0.5), ("L40S", 0.25)],
}


def cluster(kind: str, ranks: int) -> list:
    parts = CLUSTERS[kind]
    counts = [int(ranks * f) for _, f in parts]
    counts[0] += ranks - sum(counts)
    return load_profiles([{"name": n, "count": c} for (n, _), c in zip(parts, counts) if c])


def run_case(model: str, kind: str, ranks: int, solver: str, time_limit: float, per_rank_batch: int,
             ilp_max_binaries: int) -> dict:
    shape = MODEL_SHAPES[model]
    stats = synthetic_stats(shape.num_moe_layers, shape.num_experts, 4096, shape.top_k, skew=1.0, seed=0)
    units = max(shape.num_experts, ranks)  # automatic replicas: enough for every rank to host one
    row = {"model": model, "cluster": kind, "ranks": ranks, "solver": solver}
    if solver == "ilp" and units * ranks > ilp_max_binaries:
        return row | {"skipped": f"{units * ranks} binaries per layer > --ilp-max-binaries"}
    t0 = time.perf_counter()
    try:
        p = plan(cluster(kind, ranks), stats, global_batch=per_rank_batch * ranks, model_shape=model, solver=solver,
                 time_limit=time_limit)
    except ConfigError as e:
        return row | {"skipped": str(e)}
    wall = time.perf_counter() - t0
    pr = p.predicted
    return row | {
        "planner_wall_s": wall,
        "solver_wall_s": p.meta["solver_wall_s"],
        "solver_status": p.meta["solver_status"],
        "candidate": p.meta["candidate"],
        "candidates": p.meta["candidates"],
        "step_s": pr["step_time"],
        "uniform_s": pr["uniform_step_time"],
        "uniform_fits_memory": pr["uniform_memory_ok"],
        "ideal_s": pr["ideal_step_time"],
        "speedup_vs_uniform": pr["speedup_vs_uniform"],
        "efficiency_vs_ideal": pr["efficiency_vs_ideal"],
    }


# ------------------------------------------------------------------------------- measured on CPU ranks
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
    import torch

    import deepspeed

    import ds_hexamoe

    deepspeed.init_distributed("gloo")
    times = []
    for b in sizes:
        cfg = _ds_config(b, {"kernels": "torch", "sharding": "fssdp"})
        engine, *_ = ds_hexamoe.initialize(model=_bench_model(), config=cfg)
        walls = []
        for i in range(repeats + 2):
            x = _bench_batch(i, b, seq)
            t0 = time.perf_counter()
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            if i >= 2:
                walls.append(time.perf_counter() - t0)
        times.append(statistics.median(walls))
    return times


def calibrate(seq: int, sizes=(4, 24), repeats: int = 5) -> dict:
    """Seconds per sample and per step (fixed) of one unslowed rank: the same DeepSpeed + ds-hexamoe engine
    the measured runs use, alone on one gloo rank with one thread; a line through the median step times
    at two batch sizes. The fixed part (optimizer step, engine overhead) is declared as the profiles'
    ``step_overhead_s``, which a slowed rank pays ``slowdown`` times like its compute."""
    from ds_hexamoe.testing import run_distributed

    (times,) = run_distributed(_calib_worker, 1, seq, sizes, repeats, init_process_group=False, timeout=600)
    return _fit(sizes, times)


def _link_worker(rank, world, nbytes=8 << 20, repeats=7):
    import torch
    import torch.distributed as dist

    from ds_hexamoe.hetero.profiling import measure_latency

    lat = measure_latency()
    x = torch.zeros(nbytes // 4 // world * world)  # equal splits
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)
    walls = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(y, x)
        walls.append(time.perf_counter() - t0)
    # each rank sends (world - 1) / world of its buffer
    return {"latency_us": lat, "bandwidth_gbps": nbytes * (world - 1) / world / statistics.median(walls) / 1e9}


def calibrate_link(world_size: int) -> dict:
    """Per-collective latency (median tiny all_reduce) and per-rank bandwidth (an 8 MB all_to_all_single)
    of ``world_size`` gloo ranks on this machine: the ``latency_us`` and ``bandwidth_gbps`` the devices
    declare."""
    from ds_hexamoe.testing import run_distributed

    res = run_distributed(_link_worker, world_size, timeout=300)
    return {"latency_us": max(r["latency_us"] for r in res), "bandwidth_gbps": min(r["bandwidth_gbps"] for r in res)}


def _bench_worker(rank, world, hexamoe, micro, seq, rounds, steps, warmup, cal_sizes, slowdowns, flops_per_sample,
                  update_bytes):
    """In one process group: (1) calibration, every rank unslowed with equal shares, fitting each rank's
    work outside collectives as ``fixed + per_sample * b + shard * w`` (``b`` samples, shard weight ``w``)
    from even shards at two batch sizes and uneven shards at one (so FSSDP's host work, the sharded
    optimizer and two ranks sharing the machine are in it); (2) a re-plan with the devices declared from
    that fit (shards migrate); (3) alternating blocks of steps with the uniform plan and the planner's,
    the order flipping every round so drift on a noisy machine hits both alike."""
    import torch

    import deepspeed

    import ds_hexamoe
    from ds_hexamoe.fssdp.migrate import migrate_shards
    from ds_hexamoe.hetero import count_tokens, loss_scale, split_batch

    deepspeed.init_distributed("gloo")
    engine, *_ = ds_hexamoe.initialize(model=_bench_model(), config=_ds_config(micro, hexamoe))
    rt = engine.hexamoe
    h = rt.hetero
    clock = h.clock
    step = 0

    def block(shares, weights, n):
        nonlocal step
        h.batch_shares = list(shares)
        if rt.fssdp is not None:
            migrate_shards(rt.fssdp, weights)
        walls, laps = [], []
        for i in range(warmup + n):
            ids = _bench_batch(1000 + step, sum(shares), seq)
            step += 1
            x = split_batch(ids, h, rank)
            torch.distributed.barrier()
            clock.lap()
            t0 = time.perf_counter()
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss * loss_scale(count_tokens(x), count_tokens(ids), world))
            engine.step()
            rt.after_step(engine.global_steps)
            if i >= warmup:
                walls.append(time.perf_counter() - t0)
                laps.append(h.step_times[-1])
        return walls, laps

    even = [1.0 / world] * world
    spread = [float(w) for w in torch.linspace(1.5, 0.5, world) / world]  # uneven shards, same hardware
    slow, clock.slowdown = clock.slowdown, 1.0

    def busy_per_rank(shares, weights):
        _, laps = block(shares, weights, 2 * steps)  # twice the steps: every plan's prediction rests on these
        t = torch.zeros(world, dtype=torch.float64)
        t[rank] = statistics.median(lp["busy_s"] for lp in laps)
        torch.distributed.all_reduce(t)
        return t.tolist()

    busy = [statistics.mean(busy_per_rank([b] * world, even)) for b in cal_sizes]
    # the owner's share of the work: optimizer step and packing over its experts, linear in its shard
    uneven = busy_per_rank([cal_sizes[-1]] * world, spread)
    clock.slowdown = slow
    cal2 = _fit(cal_sizes, busy)
    per_shard = max(1e-6, float(np.polyfit(spread, uneven, 1)[0]))  # seconds per step owning every expert
    cal2.update(shard_s=per_shard, fixed_s=max(0.0, cal2["fixed_s"] - per_shard / world), uneven_busy_s=uneven,
                uneven_shards=spread)
    # declared as the effective memory bandwidth of that work: the model's expert-update bytes per second
    cal2["memory_bandwidth_gbps"] = update_bytes / per_shard / 1e9
    devices = [dict(d, tflops=flops_per_sample / cal2["per_sample_s"] / 1e12, step_overhead_s=cal2["fixed_s"],
                    memory_bandwidth_gbps=cal2["memory_bandwidth_gbps"]) for d in hexamoe["devices"]]
    # the calibration's batches are not the training batch: leave them out of the routing window (the
    # re-plan reads the sequence length from tokens per forward)
    h.window_stats()
    h.replan(profiles=devices, step=engine.global_steps)
    plans = {"uniform": ([micro] * world, even), "planned": (list(h.batch_shares), list(h.shard_weights))}
    out = {n: {"walls": [], "laps": [], "owned": None} for n in plans}
    for rnd in range(rounds):
        for name in (("uniform", "planned") if rnd % 2 == 0 else ("planned", "uniform")):
            walls, laps = block(*plans[name], steps)
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
    hdr = f"{'plan':<10}{'shares':>12}{'shards':>16}{'measured s':>12}{'predicted s':>13}{'pred err':>10}{'busy s/rank':>22}"
    print(hdr)
    print("-" * len(hdr))
    for n in ("uniform", "planned"):
        r = m[n]
        sw = "/".join(f"{w:.2f}" for w in r["shard_weights"])
        busy = "/".join(f"{b:.3f}" for b in r["busy_s"])
        print(f"{n:<10}{str(r['shares']):>12}{sw:>16}{r['measured_s']:>12.3f}{r['predicted_s']:>13.3f}"
              f"{100 * m['prediction_error'][n]:>9.1f}%{busy:>22}")
    print(f"{'ideal':<10}{'':>28}{m['ideal_s']:>12.3f}{m['ideal_predicted_s']:>13.3f}   (work / summed speed; "
          f"{m['ideal_one_rank_s']:.3f} s from the one-rank calibration)")
    print(f"planned: x{m['speedup_vs_uniform']:.2f} vs uniform, {100 * m['planned_vs_ideal']:.0f}% of ideal; goals: "
          f"within 10% of ideal {'met' if m['goals']['within_10pct_of_ideal'] else 'NOT met'}, prediction within 15% "
          f"{'met' if m['goals']['prediction_within_15pct'] else 'NOT met'}")


def _passthrough(argv) -> int | None:
    """``--zebra`` hands the rest of the command line to scripts/bench_zebra.py (when it is built);
    ``--validate`` runs scripts/bench_validate.py (simulator against the runtime, per mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--zebra" in argv:
        rest = [a for a in argv if a != "--zebra"]
        if not (pathlib.Path(__file__).parent / "bench_zebra.py").exists():
            print("--zebra: scripts/bench_zebra.py is not built yet; nothing to run")
            return 2
        import bench_zebra

        bench_zebra.main(rest)
        return 0
    if "--validate" in argv:
        import bench_validate

        return bench_validate.cli(argv)
    return None


def main(argv=None) -> int:
    done = _passthrough(argv)
    if done is not None:
        return done
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--models", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b"])
    ap.add_argument("--clusters", nargs="+", default=list(CLUSTERS))
    ap.add_argument("--solvers", nargs="+", default=["greedy", "eplb", "ilp"])
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--per-rank-batch", type=int, default=2)
    ap.add_argument("--ilp-max-binaries", type=int, default=70_000)
    ap.add_argument("--out", default="bench_hetero.json")
    ap.add_argument("--measured", action="store_true", help="also run the measured CPU part")
    ap.add_argument("--measured-only", action="store_true", help="only the measured CPU part")
    ap.add_argument("--slowdowns", type=float, nargs="+", default=[1.0, 3.0], help="per-rank slowdown (measured part)")
    ap.add_argument("--micro", type=int, default=16, help="nominal samples per rank and micro-step (measured part)")
    ap.add_argument("--rounds", type=int, default=5, help="blocks per plan, alternating (measured part)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per block (measured part)")
    ap.add_argument("--no-fssdp", action="store_true", help="measured part with replicated experts (ZeRO-2 only)")
    args = ap.parse_args(argv)
    rows = []
    measured = None
    if args.measured or args.measured_only:
        measured = measured_cpu(len(args.slowdowns), tuple(args.slowdowns), micro=args.micro, rounds=args.rounds, steps=args.steps,
                                fssdp=not args.no_fssdp)
        print_measured(measured)
    if args.measured_only:
        args.models = []
    hdr = f"{'model':<15}{'cluster':<16}{'ranks':>6} {'solver':<7}{'plan s':>8}{'step s':>9}{'uniform s':>10}" \
          f"{'ideal s':>9}{'x unif':>8}{'% ideal':>8}  chosen / status"
    print(hdr)
    print("-" * len(hdr))
    for model in args.models:
        for kind in args.clusters:
            for ranks in args.ranks:
                for solver in args.solvers:
                    r = run_case(model, kind, ranks, solver, args.time_limit, args.per_rank_batch, args.ilp_max_binaries)
                    rows.append(r)
                    if "skipped" in r:
                        print(f"{model:<15}{kind:<16}{ranks:>6} {solver:<7}  skipped: {r['skipped'][:90]}")
                        continue
                    print(f"{model:<15}{kind:<16}{ranks:>6} {solver:<7}{r['planner_wall_s']:>8.2f}{r['step_s']:>9.3f}"
                          f"{r['uniform_s']:>10.3f}{'' if r['uniform_fits_memory'] else '*':1}{r['ideal_s']:>8.3f}"
                          f"{r['speedup_vs_uniform']:>8.2f}{100 * r['efficiency_vs_ideal']:>7.0f}%  "
                          f"{r['candidate']} / {r['solver_status']}", flush=True)
    print("* uniform plan exceeds some rank's memory (its time is still shown)")
    with open(args.out, "w") as fh:
        json.dump({"host": platform.node(), "python": platform.python_version(), "args": vars(args), "rows": rows,
                   "measured_cpu": measured}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

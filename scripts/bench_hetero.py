"""Heterogeneous placement at cluster scale, simulated: planner wall time per solver and the predicted
speed-up over the uniform plan (and the distance to the ideal), for Mixtral 8x7B and Qwen3-30B-A3B on
64-1024 ranks of mixed GPU generations. Prints a table and writes JSON.

    python scripts/bench_hetero.py [--ranks 64 256 1024] [--models mixtral-8x7b qwen3-30b-a3b]
                                   [--solvers greedy eplb ilp] [--time-limit 20] [--out bench_hetero.json]

The ILP is skipped where one layer's problem exceeds --ilp-max-binaries (the MILP build alone would
dominate). ``--measured`` (or ``--measured-only``) adds the measured part: ``measured_cpu`` trains a small
Mixtral on 2 (or more) gloo CPU ranks, one emulated slower by the runtime, with the uniform plan and the
planner's, against the ideal bound and the simulator's predictions (``"measured_cpu"`` in the JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from ds_hexamoe.config import ConfigError
from ds_hexamoe.placement.model import MODEL_SHAPES
from ds_hexamoe.placement.planner import plan
from ds_hexamoe.placement.profiles import load_profiles
from ds_hexamoe.placement.stats import synthetic_stats

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


def _calib_worker(rank, world, seq, sizes, repeats):
    import torch

    import deepspeed

    import ds_hexamoe

    deepspeed.init_distributed("gloo")
    times = []
    for b in sizes:
        cfg = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
               "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
               "hexamoe": {"kernels": "torch", "sharding": "fssdp"}}
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
    per_sample = (times[1] - times[0]) / (sizes[1] - sizes[0])
    return {"per_sample_s": per_sample, "fixed_s": max(0.0, times[0] - per_sample * sizes[0]), "sizes": list(sizes),
            "times_s": times}


def _bench_worker(rank, world, hexamoe, micro, seq, steps, uniform):
    import torch

    import deepspeed

    import ds_hexamoe
    from ds_hexamoe.hetero import count_tokens, loss_scale, split_batch

    deepspeed.init_distributed("gloo")
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 2}, "steps_per_print": 10**9, "hexamoe": hexamoe}
    engine, *_ = ds_hexamoe.initialize(model=_bench_model(), config=cfg)
    rt = engine.hexamoe
    h = rt.hetero
    if uniform:
        h.batch_shares = [micro] * world
    walls = []
    for step in range(steps):
        ids = _bench_batch(1000 + step, micro * world, seq)
        x = split_batch(ids, h, rank)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss * loss_scale(count_tokens(x), count_tokens(ids), world))
        engine.step()
        rt.after_step(engine.global_steps)
        walls.append(time.perf_counter() - t0)
    weights = h.shard_weights if h.fssdp_weights() is not None else [w / sum(hexamoe["shard_weights"]) for w in hexamoe["shard_weights"]]
    return {"walls": walls, "shares": list(h.batch_shares), "shard_weights": list(weights),
            "owned": [layer.local_count for layer in rt.fssdp.layers] if rt.fssdp is not None else None,
            "predicted": {k: v for k, v in rt.plan.predicted.items() if not isinstance(v, (dict, list))},
            "per_rank_busy": rt.plan.predicted["per_rank"]["busy"],
            "uniform_busy": rt.plan.predicted["uniform_per_rank"]["busy"],
            "step_times": h.step_times}


def measured_cpu(world_size: int = 2, slowdowns: tuple[float, ...] = (1.0, 3.0), micro: int = 16, seq: int = SEQ,
                 steps: int = 8, warmup: int = 2, fssdp: bool = True) -> dict:
    """Train the bench Mixtral on ``world_size`` gloo CPU ranks, rank ``r`` emulated ``slowdowns[r]`` times
    slower by the runtime (it sleeps ``(s - 1) x`` its own work before each collective), once with equal
    shares and even shards (uniform) and once with the planner's shares and shard weights; the profiles
    are declared with the TFLOP/s this CPU reaches on the model alone (``calibrate``). Reports the median
    measured step time of each, the ideal bound, and the simulator's prediction for both plans."""
    from ds_hexamoe.hetero import model_shape_for
    from ds_hexamoe.testing import run_distributed

    if len(slowdowns) != world_size:
        raise ConfigError(f"--slowdowns: got {len(slowdowns)} factors for {world_size} ranks; give one per rank")
    cal = calibrate(seq)
    shape = model_shape_for(_bench_model(), seq_len=seq)
    k = BENCH_MODEL["num_experts_per_tok"]
    flops_per_sample = seq * (shape.dense_flops_per_token + shape.num_moe_layers * k * shape.pair_flops)
    tflops = flops_per_sample / cal["per_sample_s"] / 1e12
    devices = [{"name": f"cpu-x{s:g}", "tflops": tflops, "memory_gb": 4.0, "bandwidth_gbps": 2.0, "slowdown": s,
                "step_overhead_s": cal["fixed_s"]} for s in slowdowns]
    hexamoe = {"kernels": "torch", "profile": "declared", "devices": devices}
    if fssdp:
        hexamoe["sharding"] = "fssdp"
    runs = {}
    for name, uniform in (("uniform", True), ("planned", False)):
        hx = dict(hexamoe, shard_weights=[1.0] * world_size) if (uniform and fssdp) else hexamoe
        res = run_distributed(_bench_worker, world_size, hx, micro, seq, steps + warmup, uniform,
                              init_process_group=False, timeout=900)
        walls = [max(r["walls"][i] for r in res) for i in range(warmup, steps + warmup)]
        runs[name] = {"measured_s": statistics.median(walls), "walls_s": walls, "shares": res[0]["shares"],
                      "shard_weights": res[0]["shard_weights"], "experts_owned": [r["owned"] for r in res],
                      "busy_s": [statistics.median(t["busy_s"] for t in r["step_times"][warmup:]) for r in res],
                      "comm_s": [statistics.median(t["comm_s"] for t in r["step_times"][warmup:]) for r in res]}
        pred = res[0]["predicted"]
        runs[name]["predicted_s"] = pred["uniform_step_time"] if uniform else pred["step_time"]
        runs["ideal_predicted_s"] = pred["ideal_step_time"]
    G = micro * world_size
    speed = sum(1.0 / s for s in slowdowns)
    # the work of one step over the ranks' summed speed, every rank also paying its own fixed per-step cost
    # (valid while no rank's overhead alone exceeds it, as here)
    ideal_measured = (G * cal["per_sample_s"] + world_size * cal["fixed_s"]) / speed
    out = {"world_size": world_size, "slowdowns": list(slowdowns), "global_batch": G, "seq_len": seq, "fssdp": fssdp,
           "calibration": cal, "declared_tflops": tflops, "ideal_s": ideal_measured,
           "ideal_without_overhead_s": G * cal["per_sample_s"] / speed, **runs}
    p = runs["planned"]
    out["planned_vs_ideal"] = ideal_measured / p["measured_s"]
    out["prediction_error"] = {n: runs[n]["predicted_s"] / runs[n]["measured_s"] - 1 for n in ("uniform", "planned")}
    out["speedup_vs_uniform"] = runs["uniform"]["measured_s"] / p["measured_s"]
    out["goals"] = {"within_10pct_of_ideal": out["planned_vs_ideal"] >= 1 / 1.1,
                    "prediction_within_15pct": all(abs(e) <= 0.15 for e in out["prediction_error"].values())}
    return out


def print_measured(m: dict) -> None:
    print(f"\nmeasured on {m['world_size']} CPU ranks (slowdowns {m['slowdowns']}, global batch {m['global_batch']} x "
          f"{m['seq_len']} tokens, FSSDP {m['fssdp']}); calibrated {m['declared_tflops'] * 1e3:.2f} GFLOP/s, "
          f"{m['calibration']['per_sample_s'] * 1e3:.1f} ms/sample + {m['calibration']['fixed_s'] * 1e3:.1f} ms/step")
    hdr = f"{'plan':<10}{'shares':>12}{'shards':>16}{'measured s':>12}{'predicted s':>13}{'pred err':>10}{'busy s/rank':>22}"
    print(hdr)
    print("-" * len(hdr))
    for n in ("uniform", "planned"):
        r = m[n]
        sw = "/".join(f"{w:.2f}" for w in r["shard_weights"])
        busy = "/".join(f"{b:.3f}" for b in r["busy_s"])
        print(f"{n:<10}{str(r['shares']):>12}{sw:>16}{r['measured_s']:>12.3f}{r['predicted_s']:>13.3f}"
              f"{100 * m['prediction_error'][n]:>9.1f}%{busy:>22}")
    print(f"{'ideal':<10}{'':>28}{m['ideal_s']:>12.3f}{m['ideal_predicted_s']:>13.3f}   (work / summed speed)")
    print(f"planned: x{m['speedup_vs_uniform']:.2f} vs uniform, {100 * m['planned_vs_ideal']:.0f}% of ideal; goals: "
          f"within 10% of ideal {'met' if m['goals']['within_10pct_of_ideal'] else 'NOT met'}, prediction within 15% "
          f"{'met' if m['goals']['prediction_within_15pct'] else 'NOT met'}")


def main(argv=None) -> int:
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
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (measured part)")
    ap.add_argument("--no-fssdp", action="store_true", help="measured part with replicated experts (ZeRO-2 only)")
    args = ap.parse_args(argv)
    rows = []
    measured = None
    if args.measured or args.measured_only:
        measured = measured_cpu(len(args.slowdowns), tuple(args.slowdowns), micro=args.micro, steps=args.steps,
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

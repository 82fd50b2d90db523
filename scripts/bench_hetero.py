"""Heterogeneous placement at cluster scale, simulated: planner wall time per solver and the predicted
speed-up over the uniform plan (and the distance to the ideal), for Mixtral 8x7B and Qwen3-30B-A3B on
64-1024 ranks of mixed GPU generations. Prints a table and writes JSON.

    python scripts/bench_hetero.py [--ranks 64 256 1024] [--models mixtral-8x7b qwen3-30b-a3b]
                                   [--solvers greedy eplb ilp] [--time-limit 20] [--out bench_hetero.json]

The ILP is skipped where one layer's problem exceeds --ilp-max-binaries (the MILP build alone would
dominate); ``measured_cpu`` is the multi-rank CPU measurement, left for the FSSDP runtime.
"""
from __future__ import annotations

import argparse
import json
import platform
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


def measured_cpu(world_size: int = 4, slowdowns: tuple[float, ...] = (1.0, 1.0, 2.0, 3.0), steps: int = 5) -> dict:
    """LEAD: the measured part of this benchmark (needs the FSSDP runtime from another helper).

    Intended: run a tiny Mixtral on ``world_size`` gloo ranks (``ds_hexamoe.testing.run_distributed``) with
    per-rank ``slowdown`` emulation, once with the uniform plan and once with ``plan(...)``'s batch shares
    and placement, time ``steps`` training steps in the same process, and report measured against
    simulated speed-up.
    """
    raise NotImplementedError(
        "measured_cpu needs the FSSDP training runtime (slowdown emulation, batch shares and placement applied "
        "per rank), which is not in this checkout; the simulated part above does not need it")


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
    args = ap.parse_args(argv)
    rows = []
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
        json.dump({"host": platform.node(), "python": platform.python_version(), "args": vars(args), "rows": rows},
                  fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

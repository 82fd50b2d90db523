"""Heterogeneous placement at cluster scale, simulated: planner wall time per solver and the predicted
speed-up over the uniform plan (and the distance to the ideal), for Mixtral 8x7B and Qwen3-30B-A3B on
64-1024 ranks of mixed GPU generations. Prints a table and writes JSON.

    python scripts/bench_hetero.py [--ranks 64 256 1024] [--models mixtral-8x7b qwen3-30b-a3b]
                                   [--solvers greedy eplb ilp] [--time-limit 20] [--out bench_hetero.json]

The ILP is skipped where one layer's problem exceeds --ilp-max-binaries (the MILP build alone would
dominate). ``--measured`` (or ``--measured-only``) adds the measured part: ``measured_cpu`` trains a small
Mixtral on 2 (or more) gloo CPU ranks, one emulated slower by the runtime, alternating blocks of steps
with the uniform plan and the planner's in one process group, against the ideal bound and the simulator's
predictions (``"measured_cpu"`` in the JSON; code: scripts/bench_hetero_measured.py).
``--validate --world N --json F`` checks the simulator against the runtime per execution mode
(scripts/bench_validate.py); ``--zebra ...`` runs scripts/bench_zebra.py.
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import sys

from bench_common import Col, Laps, Table, write_json
from bench_hetero_measured import measured_cpu, print_measured
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
    wall = Laps()
    try:
        with wall.lap():
            p = plan(cluster(kind, ranks), stats, global_batch=per_rank_batch * ranks, model_shape=model,
                     solver=solver, time_limit=time_limit)
    except ConfigError as e:
        return row | {"skipped": str(e)}
    pr = p.predicted
    return row | {
        "planner_wall_s": wall.last,
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
    t = Table(Col("model", "<15"), Col("cluster", "<16"), Col("ranks", ">6"), Col("solver", "<7", sep=" "),
              Col("plan s", ">8.2f"), Col("step s", ">9.3f"), Col("uniform s", ">10.3f"), Col("", "1"),
              Col("ideal s", ">8.3f"), Col("x unif", ">8.2f"), Col("% ideal", ">7.0f", "%"),
              Col("chosen / status", sep="  "))
    print(t.rule())
    for model in args.models:
        for kind in args.clusters:
            for ranks in args.ranks:
                for solver in args.solvers:
                    r = run_case(model, kind, ranks, solver, args.time_limit, args.per_rank_batch, args.ilp_max_binaries)
                    rows.append(r)
                    if "skipped" in r:
                        print(t.row(model, kind, ranks, solver) + f"  skipped: {r['skipped'][:90]}")
                        continue
                    print(t.row(model, kind, ranks, solver, r["planner_wall_s"], r["step_s"], r["uniform_s"],
                                "" if r["uniform_fits_memory"] else "*", r["ideal_s"], r["speedup_vs_uniform"],
                                100 * r["efficiency_vs_ideal"], f"{r['candidate']} / {r['solver_status']}"), flush=True)
    print("* uniform plan exceeds some rank's memory (its time is still shown)")
    write_json(args.out, {"host": platform.node(), "python": platform.python_version(), "args": vars(args),
                          "rows": rows, "measured_cpu": measured})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

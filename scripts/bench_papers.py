"""HeterMoE's A40+V100 setups, simulated: the planner's predicted step per solver and mode against the
uniform plan, at 4K-32K tokens per sample. Prints a table and writes JSON.

    python scripts/bench_papers.py [--seqs 4096 8192 16384 32768] [--tokens 65536] [--out bench_papers.json]

The model is Mixtral-like (Mixtral 8x7B's block: hidden 4096, 8 experts of 14336, top-2, GQA 32/8) with
8 blocks: the full 32-block model with its Adam state (~750 GB) does not fit on 6+6 A40/V100 (480 GB).
Device speeds are the built-in table's (docs/placement.md, "Component speeds": a V100 is 0.83x an A40 at
expert GEMMs and 1/3.7 at the attention kernel). Routing: synthetic, skewed. Every number is the
simulator's; no run on those GPUs was made here.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

from ds_hexamoe.config import ConfigError
from ds_hexamoe.experts.stats import synthetic_stats
from ds_hexamoe.placement.planner import plan
from ds_hexamoe.placement.profiles import load_profiles
from ds_hexamoe.placement.shapes import MODEL_SHAPES, ModelShape

SETUPS = {"6xA40+6xV100": (6, 6), "4xA40+8xV100": (4, 8), "6xA40+3xV100": (6, 3)}
SOLVERS = ("waterfill", "asym_ea", "eplb")


def mixtral_like(seq: int) -> ModelShape:
    return ModelShape(**{**MODEL_SHAPES["mixtral-8x7b"].to_dict(), "num_moe_layers": 8, "seq_len": seq})


def run(setup: str, seq: int, tokens: int, solver: str, mode: str) -> dict:
    a40, v100 = SETUPS[setup]
    profiles = load_profiles([{"name": "A40", "count": a40}, {"name": "V100-32GB", "count": v100}])
    shape = mixtral_like(seq)
    stats = synthetic_stats(shape.num_moe_layers, shape.num_experts, 4096, shape.top_k, skew=1.0, seed=0)
    batch = max(1, tokens // seq)
    row = {"setup": setup, "seq": seq, "global_batch": batch, "solver": solver, "mode": mode}
    t0 = time.perf_counter()
    try:
        p = plan(profiles, stats, global_batch=batch, model_shape=shape, solver=solver, mode=mode)
    except ConfigError as e:
        return row | {"skipped": str(e)}
    pr = p.predicted
    return row | {"planner_wall_s": time.perf_counter() - t0, "candidate": p.meta["candidate"],
                  "step_s": pr["step_time"], "sum_bound_s": pr["sum_bound_step_time"],
                  "uniform_s": pr["uniform_step_time"], "ideal_s": pr["ideal_step_time"],
                  "tokens_per_s": batch * seq / pr["step_time"], "speedup_vs_uniform": pr["speedup_vs_uniform"],
                  "shares": p.batch_shares}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per step (global batch = tokens / seq)")
    ap.add_argument("--out", default="bench_papers.json")
    args = ap.parse_args(argv)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}")
    hdr = (f"{'setup':<14}{'seq':>7}{'batch':>6}  {'solver':<10}{'mode':<16}{'step s':>9}{'max-of-sums s':>14}"
           f"{'uniform s':>10}{'x unif':>7}{'tokens/s':>10}  chosen")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for setup in SETUPS:
        for seq in args.seqs:
            for solver, mode in [(s, "expert_parallel") for s in SOLVERS] + [("waterfill", "auto")]:
                r = run(setup, seq, args.tokens, solver, mode)
                rows.append(r)
                if "skipped" in r:
                    print(f"{setup:<14}{seq:>7}{r['global_batch']:>6}  {solver:<10}{mode:<16}skipped: {r['skipped'][:70]}")
                    continue
                print(f"{setup:<14}{seq:>7}{r['global_batch']:>6}  {solver:<10}{mode:<16}{r['step_s']:>9.3f}"
                      f"{r['sum_bound_s']:>14.3f}{r['uniform_s']:>10.3f}{r['speedup_vs_uniform']:>7.2f}"
                      f"{r['tokens_per_s']:>10.0f}  {r['candidate']}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"host": platform.node(), "uptime": uptime, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

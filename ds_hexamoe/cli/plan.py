"""``ds-hexamoe plan``: plan heterogeneous MoE training from device profiles and routing statistics.

Prints the plan as a table with the predicted step time against the uniform plan and the ideal, and
writes the plan JSON, a PNG of per-rank load and a Gantt chart of one simulated step. Returns a process exit code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import ConfigError, read_json
from ..experts.stats import RoutingStats
from ..placement.planner import plan as make_plan
from ..placement.profiles import load_profiles
from ..placement.costs import CostModel, PlanOptions
from ..placement.report import print_table, save_png, save_timeline
from ..placement.simulator import simulate
from ..placement.shapes import resolve_model


def _plan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds-hexamoe plan", description="Plan heterogeneous MoE training.")
    ap.add_argument("--devices", required=True, help='devices JSON ({"devices": [...]}), one entry per rank or with "count"')
    ap.add_argument("--stats", required=True, help="routing statistics JSON (ds-hexamoe profile-routing)")
    ap.add_argument("--model", default=None, help="model shape: a preset name or a JSON file (default: from --stats)")
    ap.add_argument("--global-batch", type=int, default=None, help="samples per step (default: 8 per rank)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the model shape's)")
    ap.add_argument("--solver", default="greedy", help="greedy (= waterfill) | asym_ea | eplb | ilp")
    ap.add_argument("--mode", default="auto", help="auto | data_centric | expert_parallel | model_centric")
    ap.add_argument("--replicas", type=int, default=None, help="extra expert replicas per layer (eplb/ilp)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="ILP time limit in seconds")
    ap.add_argument("--memory-fraction", type=float, default=0.9, help="share of each device's memory to use")
    ap.add_argument("--no-affinity", action="store_true", help="plan without the cross-layer affinity")
    ap.add_argument("--out", default=None, help="write the plan JSON here")
    ap.add_argument("--png", default=None, help="write a per-rank load chart here")
    ap.add_argument("--timeline", default=None, help="write a per-rank Gantt chart of one simulated step here (PNG)")
    return ap


def _load_model_arg(arg: str | None) -> Any:
    if arg is None or not arg.endswith(".json"):
        return arg
    return read_json(arg, "--model", "pass a preset name or a JSON file of model shape fields")


def plan_main(argv: list[str] | None = None) -> int:
    args = _plan_parser().parse_args(argv)
    try:
        profiles = load_profiles(args.devices)
        stats = RoutingStats.load_json(args.stats)
        model = resolve_model(_load_model_arg(args.model), stats.model)
        if args.seq_len is not None:
            if args.seq_len < 1:
                raise ConfigError(f"--seq-len: got {args.seq_len}; expected an integer >= 1")
            model = type(model)(**{**model.to_dict(), "seq_len": args.seq_len})
        gb = args.global_batch if args.global_batch is not None else 8 * len(profiles)
        options = dict(replicas=args.replicas, time_limit=args.time_limit, memory_fraction=args.memory_fraction,
                       use_affinity=not args.no_affinity)
        plan = make_plan(profiles, stats, global_batch=gb, model_shape=model, solver=args.solver, mode=args.mode,
                         **options)
    except ConfigError as e:
        print(f"ds-hexamoe plan: error: {e}", file=sys.stderr)
        return 2
    print_table(plan)
    if args.out:
        plan.save_json(args.out)
        print(f"wrote {args.out}")
    if args.png:
        save_png(plan, args.png)
        print(f"wrote {args.png}")
    if args.timeline:
        cost = CostModel(profiles, stats, model, gb, PlanOptions(mode=args.mode, **options))
        save_timeline(plan, simulate(plan, cost, timeline=True).timeline, args.timeline)
        print(f"wrote {args.timeline}")
    return 0

"""``ds-hexamoe plan`` and ``ds-hexamoe profile-routing``, and :func:`report` for training logs.

``plan_main(argv)`` prints the plan as a table, the predicted step time against the uniform plan and
the ideal, writes the plan JSON and a PNG of per-rank load. ``profile_main(argv)`` runs a recipe's model
on a few batches of its data with a :class:`~.stats.RoutingStatsCollector` active and writes the
routing statistics (with the model shape) as JSON. Both return a process exit code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..config import ConfigError
from .plan import Plan


# ---------------------------------------------------------------------------------------------- report
def report(plan: Plan, max_ranks: int = 16) -> str:
    """A plain-text summary of a plan for training logs."""
    p = plan.predicted
    lines = [f"hexamoe plan: {plan.world_size} ranks, global batch {plan.global_batch}, solver {plan.solver}, "
             f"modes {_mode_summary(plan)}"]
    if p:
        lines.append(f"  predicted step {p['step_time']:.4g} s (collectives {p.get('sync_time', 0.0):.3g} s); "
                     f"uniform {p['uniform_step_time']:.4g} s "
                     f"(x{p['speedup_vs_uniform']:.2f}); ideal {p['ideal_step_time']:.4g} s "
                     f"({100 * p['efficiency_vs_ideal']:.0f}% of ideal)")
    per = p.get("per_rank", {}) if p else {}
    for r in range(min(plan.world_size, max_ranks)):
        hosted = np.mean([sum(r in ranks for ranks in plan.placement[l].values()) for l in plan.layers])
        extra = (f" busy {per['busy'][r]:.4g} s idle {per['idle'][r]:.4g} s mem {per['memory_gb'][r]:.1f}/"
                 f"{per['memory_limit_gb'][r]:.1f} GB") if per else ""
        lines.append(f"  rank {r:>3} {plan.devices[r]:<12} batch {plan.batch_shares[r]:>4} shard "
                     f"{100 * plan.shard_weights[r]:5.1f}% experts/layer {hosted:5.2f}{extra}")
    if plan.world_size > max_ranks:
        lines.append(f"  ... {plan.world_size - max_ranks} more ranks")
    return "\n".join(lines)


def _mode_summary(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for m in plan.modes.values():
        counts[m] = counts.get(m, 0) + 1
    return ", ".join(f"{m} x{n}" for m, n in counts.items())


def _print_table(plan: Plan, max_ranks: int = 64) -> None:
    from rich.console import Console
    from rich.table import Table

    p = plan.predicted
    per = p["per_rank"]
    t = Table(title=f"hexamoe plan ({plan.solver}; {_mode_summary(plan)})")
    for col in ("rank", "device", "batch", "shard %", "experts/layer", "dense s", "moe s", "busy s", "idle s",
                "memory GB"):
        t.add_column(col, justify="right")
    for r in range(min(plan.world_size, max_ranks)):
        hosted = np.mean([sum(r in ranks for ranks in plan.placement[l].values()) for l in plan.layers])
        t.add_row(str(r), plan.devices[r], str(plan.batch_shares[r]), f"{100 * plan.shard_weights[r]:.1f}",
                  f"{hosted:.2f}", f"{per['dense'][r]:.4g}", f"{per['moe'][r]:.4g}", f"{per['busy'][r]:.4g}",
                  f"{per['idle'][r]:.4g}", f"{per['memory_gb'][r]:.1f}/{per['memory_limit_gb'][r]:.1f}")
    c = Console(width=None if sys.stdout.isatty() else 160)
    c.print(t)
    if plan.world_size > max_ranks:
        c.print(f"... {plan.world_size - max_ranks} more ranks (all in the JSON)")
    s = Table(title="predicted step time")
    for col in ("plan", "step s", "vs plan"):
        s.add_column(col, justify="right")
    s.add_row(f"this plan (collectives {p.get('sync_time', 0.0):.3g} s)", f"{p['step_time']:.4g}", "1.00")
    s.add_row("uniform" + ("" if p["uniform_memory_ok"] else " (over memory)"), f"{p['uniform_step_time']:.4g}",
              f"{p['uniform_step_time'] / p['step_time']:.2f}")
    s.add_row("ideal (work / speed)", f"{p['ideal_step_time']:.4g}", f"{p['ideal_step_time'] / p['step_time']:.2f}")
    c.print(s)
    cands = plan.meta.get("candidates", {})
    if cands:
        c.print("candidates: " + ", ".join(f"{n} {v:.4g} s" for n, v in cands.items())
                + f"; chose {plan.meta.get('candidate')}; solver status: {plan.meta.get('solver_status')}")


def save_png(plan: Plan, path: str) -> None:
    """Per-rank busy time (dense + MoE) and idle time, this plan beside the uniform one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = plan.predicted
    R = plan.world_size
    x = np.arange(R)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.35 * R + 4), 4), sharey=True)
    ax = axes[0]
    ax.bar(x, p["per_rank"]["dense"], label="dense", color="#4c72b0")
    ax.bar(x, p["per_rank"]["moe"], bottom=p["per_rank"]["dense"], label="MoE", color="#dd8452")
    ax.bar(x, p["per_rank"]["idle"], bottom=p["per_rank"]["busy"], label="idle", color="#dddddd", hatch="//")
    ax.set_title(f"plan ({plan.solver}): {p['step_time']:.3g} s")
    ax.set_xlabel("rank")
    ax.set_ylabel("seconds per step")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(x, p["uniform_per_rank"]["busy"], color="#8c8c8c", label="busy")
    ax.bar(x, p["uniform_per_rank"]["idle"], bottom=p["uniform_per_rank"]["busy"], color="#dddddd", hatch="//",
           label="idle")
    ax.axhline(p["ideal_step_time"], color="k", ls="--", lw=1, label="ideal")
    ax.set_title(f"uniform: {p['uniform_step_time']:.3g} s")
    ax.set_xlabel("rank")
    ax.legend(fontsize=8)
    labels = [d[:10] for d in plan.devices] if R <= 32 else None
    for a in axes:
        if labels:
            a.set_xticks(x, labels, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ plan
def _plan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds-hexamoe plan", description="Plan heterogeneous MoE training.")
    ap.add_argument("--devices", required=True, help='devices JSON ({"devices": [...]}), one entry per rank or with "count"')
    ap.add_argument("--stats", required=True, help="routing statistics JSON (ds-hexamoe profile-routing)")
    ap.add_argument("--model", default=None, help="model shape: a preset name or a JSON file (default: from --stats)")
    ap.add_argument("--global-batch", type=int, default=None, help="samples per step (default: 8 per rank)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the model shape's)")
    ap.add_argument("--solver", default="greedy", help="greedy | eplb | ilp")
    ap.add_argument("--mode", default="auto", help="auto | data_centric | expert_parallel | model_centric")
    ap.add_argument("--replicas", type=int, default=None, help="extra expert replicas per layer (eplb/ilp)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="ILP time limit in seconds")
    ap.add_argument("--memory-fraction", type=float, default=0.9, help="share of each device's memory to use")
    ap.add_argument("--no-affinity", action="store_true", help="plan without the cross-layer affinity")
    ap.add_argument("--out", default=None, help="write the plan JSON here")
    ap.add_argument("--png", default=None, help="write a per-rank load chart here")
    return ap


def _load_model_arg(arg: str | None) -> Any:
    if arg is None or not arg.endswith(".json"):
        return arg
    from ..config import read_json

    return read_json(arg, "--model", "pass a preset name or a JSON file of model shape fields")


def plan_main(argv: list[str] | None = None) -> int:
    from .model import resolve_model
    from .planner import plan as make_plan
    from .profiles import load_profiles
    from .stats import RoutingStats

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
        plan = make_plan(profiles, stats, global_batch=gb, model_shape=model, solver=args.solver, mode=args.mode,
                         replicas=args.replicas, time_limit=args.time_limit, memory_fraction=args.memory_fraction,
                         use_affinity=not args.no_affinity)
    except ConfigError as e:
        print(f"ds-hexamoe plan: error: {e}", file=sys.stderr)
        return 2
    _print_table(plan)
    if args.out:
        plan.save_json(args.out)
        print(f"wrote {args.out}")
    if args.png:
        save_png(plan, args.png)
        print(f"wrote {args.png}")
    return 0


# ------------------------------------------------------------------------------------- profile-routing
def profile_routing(model, batches, max_batches: int | None = None, collector=None):
    """Run ``model`` forward (no grad) over ``batches`` (dicts of tensors or ``input_ids`` tensors) with a
    collector active; returns the :class:`~.stats.RoutingStats` (with the model shape when the config
    is a transformers MoE config). Layers are named by their module path."""
    import torch

    from ..integrations.transformers import experts_modules
    from .model import ModelShape
    from .stats import RoutingStatsCollector, set_collector

    mods = experts_modules(model)
    if not mods:
        raise ConfigError("model: has no transformers experts modules; profile-routing needs an MoE model built "
                          'with @use_experts_implementation and experts_implementation="hexamoe"')
    impl = getattr(model.config, "_experts_implementation", None)
    if impl not in (None, "hexamoe"):
        raise ConfigError(f'model.experts_implementation: got {impl!r}; profile-routing needs "hexamoe" (its forward records routing)')
    for name, m in mods:
        m._hexamoe_name = name
    c = collector or RoutingStatsCollector()
    prev = set_collector(c)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                c.step()
                if isinstance(batch, dict):
                    keep = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                    model(**keep)
                else:
                    model(batch)
        c.step()
    finally:
        set_collector(prev)
        model.train(was_training)
    stats = c.snapshot()
    if not stats.layers:
        raise ConfigError("profile-routing: no routing was recorded; check that the data yields batches")
    try:
        shape = ModelShape.from_hf_config(model.config, seq_len=None)
        stats.model = shape.to_dict()
    except (ConfigError, TypeError):
        stats.model = None
    return stats


def _recipe_model_and_batches(recipe, n: int):
    """The recipe's model and its first ``n`` training micro-batches, built exactly as ``ds-hexamoe train``
    builds them (tokenizer loaded or trained, packed blocks, the recipe's experts implementation)."""
    import tempfile

    from ..data import build_dataset, build_tokenizer
    from ..train import build_model

    with tempfile.TemporaryDirectory(prefix="hexamoe-profile-") as tmp:
        tok = build_tokenizer(recipe, save_dir=tmp)
    model = build_model(recipe, tok)
    data = build_dataset(recipe, tok)
    mb = recipe.training.micro_batch_size
    count = min(n, len(data.train) // mb)
    if count < 1:
        raise ConfigError(f"data.train_files: {len(data.train)} blocks, fewer than one batch of {mb}; add data or "
                          "reduce training.micro_batch_size / data.seq_len")
    return model, [data.collate([data.train[j] for j in range(i * mb, (i + 1) * mb)]) for i in range(count)]


def profile_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hexamoe profile-routing",
                                 description="Collect routing statistics of a recipe's model on its data.")
    ap.add_argument("recipe", help="recipe JSON")
    ap.add_argument("--batches", type=int, default=8, help="micro-batches to run (default 8)")
    ap.add_argument("--out", default="routing.json", help="statistics JSON to write (default routing.json)")
    args = ap.parse_args(argv)
    try:
        if args.batches < 1:
            raise ConfigError(f"--batches: got {args.batches}; expected an integer >= 1")
        try:
            from ..recipes import load_recipe
        except ImportError as e:
            raise ConfigError(f"profile-routing needs ds_hexamoe.recipes ({e}); it is not installed in this checkout") from None
        recipe = load_recipe(args.recipe)
        model, batches = _recipe_model_and_batches(recipe, args.batches)
        stats = profile_routing(model, batches, args.batches)
        if stats.model is not None:
            stats.model["seq_len"] = recipe.data.seq_len
    except ConfigError as e:
        print(f"ds-hexamoe profile-routing: error: {e}", file=sys.stderr)
        return 2
    stats.save_json(args.out)
    b = stats.balance()
    print(f"recorded {len(stats.layers)} MoE layers over {stats.forwards} batches; load max/mean {b['overall']:.2f}; "
          f"wrote {args.out}")
    return 0

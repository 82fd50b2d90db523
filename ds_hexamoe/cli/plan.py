"""``ds-hexamoe plan``: the heterogeneous placement plan, from a recipe or from device and routing files.

    ds-hexamoe plan [RECIPE.json] [--set KEY=VALUE ...] [--nproc N] [--out P] [--png P] [--timeline P]
    ds-hexamoe plan --devices D.json --stats S.json [--model M] [--global-batch G] [--solver ...] ...

With a recipe (loaded as ``ds-hexamoe train`` loads it, ``--set`` included) it prints the first plan
training would make: the same :class:`~ds_hexamoe.hetero.state.PlanState`, built from the recipe's model
(its local config or checkpoint, on the meta device: no weights are read), its ``"hexamoe"`` devices and
:meth:`~ds_hexamoe.placement.PlanOptions.from_config`, for ``launcher.nproc`` ranks. With ``--devices`` and
``--stats`` it plans from those files with the planner's default options. Either way it prints the plan's
table and can write the plan JSON, a PNG of per-rank load and a Gantt chart of one simulated step.
Returns a process exit code.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from ..jsonfile import read_json
from ..experts.stats import RoutingStats
from ..placement.costs import CostModel
from ..placement.options import PlanOptions
from ..placement.plan import Plan
from ..placement.planner import plan as placement_plan
from ..placement.profiles import DeviceProfile, load_profiles
from ..placement.report import print_table, save_png, save_timeline
from ..placement.shapes import ModelShape, resolve_model
from ..placement.simulator import simulate
from .options import add_recipe_source_args, overrides_of

DECLARED = "--set 'hexamoe.profile=\"declared\"'"


@dataclass
class Planned:
    """A plan and what it was made from (for the timeline's simulation)."""

    plan: Plan
    profiles: list[DeviceProfile]
    stats: RoutingStats
    shape: ModelShape
    global_batch: int
    options: PlanOptions


def _plan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds-hexamoe plan", description="Plan heterogeneous MoE training: the plan a "
                                 "recipe's training would make, or one from --devices and --stats.")
    add_recipe_source_args(ap)
    d = PlanOptions()
    f = ap.add_argument_group("planning from files (instead of a recipe)")
    f.add_argument("--devices", help='devices JSON ({"devices": [...]}), one entry per rank or with "count"')
    f.add_argument("--stats", help="routing statistics JSON (ds-hexamoe profile-routing)")
    f.add_argument("--model", default=None, help="model shape: a preset name or a JSON file (default: from --stats)")
    f.add_argument("--global-batch", type=int, default=None, help="samples per step (default: 8 per rank)")
    f.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the model shape's)")
    f.add_argument("--solver", help=f"greedy (= waterfill) | bubble_squeeze | eplb | ilp (default: {d.solver})")
    f.add_argument("--mode", help=f"auto | data_centric | expert_parallel | model_centric | hecate (default: {d.mode})")
    f.add_argument("--replicas", type=int, default=None, help="extra expert replicas per layer (eplb/ilp)")
    f.add_argument("--time-limit", type=float, help=f"ILP time limit in seconds (default: {d.time_limit})")
    f.add_argument("--memory-fraction", type=float,
                   help=f"share of each device's memory to use (default: {d.memory_fraction})")
    f.add_argument("--no-affinity", action="store_true", help="plan without the cross-layer affinity")
    o = ap.add_argument_group("outputs")
    o.add_argument("--out", default=None, help="write the plan JSON here")
    o.add_argument("--png", default=None, help="write a per-rank load chart here")
    o.add_argument("--timeline", default=None, help="write a per-rank Gantt chart of one simulated step here (PNG)")
    return ap


_FILE_FLAGS = ("devices", "stats", "model", "global_batch", "seq_len", "solver", "mode", "replicas", "time_limit",
               "memory_fraction", "no_affinity")


def plan_main(argv: list[str] | None = None) -> int:
    args = _plan_parser().parse_args(argv)
    try:
        planned = _from_files(args) if args.devices is not None or args.stats is not None else _from_recipe(args)
    except ConfigError as e:
        print(f"ds-hexamoe plan: error: {e}", file=sys.stderr)
        return 2
    plan = planned.plan
    print_table(plan)
    if args.out:
        plan.save_json(args.out)
        print(f"wrote {args.out}")
    if args.png:
        save_png(plan, args.png)
        print(f"wrote {args.png}")
    if args.timeline:
        cost = CostModel(planned.profiles, planned.stats, planned.shape, planned.global_batch, planned.options)
        save_timeline(plan, simulate(plan, cost, timeline=True).timeline, args.timeline)
        print(f"wrote {args.timeline}")
    return 0


# ------------------------------------------------------------------------------------------- from files
def _load_model_arg(arg: str | None) -> Any:
    if arg is None or not arg.endswith(".json"):
        return arg
    return read_json(arg, "--model", "pass a preset name or a JSON file of model shape fields")


def _from_files(args) -> Planned:
    if args.recipe is not None or args.set:
        raise ConfigError("--devices/--stats: plan from files or from a recipe, not both; a recipe takes its devices "
                          "from hexamoe.devices and its options from the recipe (--set KEY=VALUE)")
    if args.devices is None or args.stats is None:
        raise ConfigError(f"--{'stats' if args.stats is None else 'devices'}: missing; planning from files needs both "
                          "--devices and --stats (or give a recipe instead)")
    profiles = load_profiles(args.devices)
    stats = RoutingStats.load_json(args.stats)
    model = resolve_model(_load_model_arg(args.model), stats.model)
    if args.seq_len is not None:
        if args.seq_len < 1:
            raise ConfigError(f"--seq-len: got {args.seq_len}; expected an integer >= 1")
        model = type(model)(**{**model.to_dict(), "seq_len": args.seq_len})
    gb = args.global_batch if args.global_batch is not None else 8 * len(profiles)
    given = {"solver": args.solver, "mode": args.mode, "replicas": args.replicas, "time_limit": args.time_limit,
             "memory_fraction": args.memory_fraction, "use_affinity": False if args.no_affinity else None}
    options = PlanOptions().replace(**{k: v for k, v in given.items() if v is not None})
    plan = placement_plan(profiles, stats, global_batch=gb, model_shape=model, options=options)
    return Planned(plan, profiles, stats, model, gb, options)


# ------------------------------------------------------------------------------------------ from a recipe
def _from_recipe(args) -> Planned:
    from ..recipes import load_recipe
    from ..recipes.checks import world_size

    given = [f"--{k.replace('_', '-')}" for k in _FILE_FLAGS if getattr(args, k, None) not in (None, False)]
    if given:
        raise ConfigError(f"{given[0]}: with a recipe, options come from the recipe; change them with --set "
                          "(e.g. --set hexamoe.placement.solver='\"ilp\"')")
    # the data is not read: a plan for more ranks than the recipe's data fills is still a plan
    recipe = load_recipe(args.recipe, overrides=overrides_of(args), check_data=False)
    cfg = recipe.hexamoe_config
    _check_plannable(cfg)
    world = world_size(recipe)
    if world is None:
        raise ConfigError("launcher.nproc: not set, so the launcher decides the rank count at start; the plan splits "
                          "every micro-batch over the ranks: set it (--nproc N)")
    options = PlanOptions.from_config(cfg)
    state = _plan_state(recipe, cfg, options, world)
    print(f"ds-hexamoe plan: {recipe.name!r} on {world} ranks, profile {cfg.profile!r}, global micro-batch "
          f"{state.global_batch} ({recipe.training.micro_batch_size} per rank x {world}), {state.shape.seq_len} tokens "
          f"per sample (the model's, as in training's first plan)")
    print(f"planner options: {options.to_dict()}")
    print(f"batch shares: {list(state.batch_shares)}")
    print(f"shard weights: {[round(w, 4) for w in state.shard_weights]}"
          + (" (not applied: hexamoe.shard_weights is set)" if state.weights_fixed else ""))
    return Planned(state.plan, state.profiles, state.stats, state.shape, state.global_batch, options)


def _check_plannable(cfg) -> None:
    """Refuse, saying why, what one process cannot plan the way training would."""
    if cfg is None or not cfg.enabled:
        raise ConfigError('hexamoe: the recipe has no enabled "hexamoe" section, so training makes no plan')
    if cfg.profile == "uniform":
        raise ConfigError('hexamoe.profile: "uniform" makes no plan at the start of training (even batch shares and '
                          'shards; "mode": "auto" re-plans from routing statistics only during training); declare '
                          f"the devices to plan for: {DECLARED} with hexamoe.devices")
    if cfg.profile == "measure":
        raise ConfigError('hexamoe.profile: "measure" times every rank\'s own device when training starts (and again '
                          "at the data's sequence length after the first step, then calibrates against the first "
                          "steps); one process cannot reproduce those numbers. Plan with the declared devices "
                          f"instead: {DECLARED} (each hexamoe.devices entry then needs a known GPU name or \"tflops\" "
                          'and "memory_gb")')


def _plan_state(recipe, cfg, options: PlanOptions, world: int):
    """The :class:`PlanState` rank 0 of training builds first, in this process (prints the same plan report)."""
    from ..hetero.state import PlanState

    model = _meta_model(recipe)
    return PlanState.from_config(model, cfg, recipe.ds_config(world), options=options, world=world, rank=0)


def _meta_model(recipe):
    """The recipe's model as training builds it (:func:`ds_hexamoe.tasks.build_model`), on the meta device: its
    shapes and dtype without reading or allocating weights. Causal LMs only."""
    from ..recipes import CAUSAL_LM
    from ..tasks import build_model, build_tokenizer

    if recipe.task != CAUSAL_LM:
        raise ConfigError(f"task: {recipe.task!r}; ds-hexamoe plan RECIPE builds causal-LM models only: plan this "
                          "one with --devices and --stats (ds-hexamoe profile-routing)")
    m = recipe.model
    # a fresh model's vocabulary follows the tokenizer, as in training (a checkpoint has its own)
    tokenizer = build_tokenizer(recipe) if m.path is None and "vocab_size" not in (m.config or {}) else None
    return build_model(recipe, tokenizer, meta=True)

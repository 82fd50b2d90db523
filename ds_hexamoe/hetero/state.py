"""The one owner of an engine's current plan, and the one re-plan path.

:class:`PlanState` holds what every plan of a job is made from: the planner's options
(:meth:`~ds_hexamoe.placement.PlanOptions.from_config`, built once), the model shape taken before FSSDP
sharded the experts, the global micro-batch (:func:`.planning.global_micro_batch`: samples per
micro-step over all ranks, the one rule), the device profiles and the routing statistics. It makes the
first plan, and :meth:`PlanState.replan` is the only way a plan changes: the heterogeneous controller
(``"profile"`` "declared"/"measure") and the FSSDP-only re-plan (``"mode": "auto"`` or replicas) both
call it. ``engine.hexamoe.plan`` reads :attr:`PlanState.plan`; ``ds-hexamoe plan RECIPE.json`` builds the
same state in one process and prints its first plan (docs/placement.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch.distributed as dist

from ..config import ConfigError, HexaMoEConfig
from ..distributed import dist_on
from ..experts import RoutingStats, uniform_stats
from ..fssdp.migrate import migrate_shards
from ..placement.options import PlanOptions
from ..placement.plan import Plan
from ..placement.profiles import DeviceProfile, load_profiles
from ..placement.report import report
from ..placement.shapes import ModelShape
from .planning import at_least_one, global_micro_batch, make_plan, micro_tokens, model_shape_for, moe_layers, shape_for_stats
from .resolve import load_declared, resolve_profiles

logger = logging.getLogger("ds_hexamoe.hetero")


def match_layers(stats: RoutingStats, layers: list[tuple[str, int, int]], where: str) -> RoutingStats:
    """``stats`` named by this model's MoE layers (same structure, maybe another module prefix: by call order)."""
    names = [n for n, _, _ in layers]
    if stats.layers == names:
        return stats
    if len(stats.layers) != len(names) or any(stats.num_experts(a) != e for a, (_, e, _) in zip(stats.layers, layers)):
        raise ConfigError(f"{where}: statistics of layers {stats.layers[:3]}... ({len(stats.layers)} layers) do not "
                          f"match this model's MoE layers {names[:3]}... ({len(names)}); profile this model")
    ren = dict(zip(stats.layers, names))
    return RoutingStats(names, {ren[l]: c for l, c in stats.counts.items()}, {ren[l]: t for l, t in stats.tokens.items()},
                        {ren[l]: k for l, k in stats.top_k.items()},
                        {(ren[a], ren[b]): m for (a, b), m in stats.affinity.items()}, stats.forwards, stats.model)


def as_profiles(profiles: Any, world: int) -> list[DeviceProfile]:
    """One resolved profile per rank from anything ``load_profiles`` takes."""
    if isinstance(profiles, list) and all(isinstance(p, DeviceProfile) for p in profiles):
        new = list(profiles)
    else:
        new = load_profiles(profiles)
    if len(new) != world:
        raise ConfigError(f"replan(profiles): got {len(new)} profiles for WORLD_SIZE={world}")
    return new


class PlanState:
    """The current plan of one engine (``plan``, ``batch_shares``, ``shard_weights``, ``history``) and what
    re-planning needs. ``drives_batches``: device profiles drive the run ("declared"/"measure"), so the plan's
    batch shares are applied and, unless ``hexamoe.shard_weights`` is set, its shard weights too."""

    def __init__(self, cfg: HexaMoEConfig, options: PlanOptions, shape: ModelShape, layers: list[tuple[str, int, int]],
                 global_batch: int, world: int, rank: int, group=None, profiles: list[DeviceProfile] | None = None,
                 stats: RoutingStats | None = None, stats_source: str = "uniform"):
        self.cfg, self.options, self.shape, self.layers = cfg, options, shape, layers
        self.global_batch, self.world, self.rank, self.group = global_batch, world, rank, group
        self.profiles = profiles  # None: resolved at each re-plan ("profile": "uniform")
        self.stats = stats
        self.stats_source = stats_source
        self.drives_batches = cfg.profile != "uniform"
        self.plan: Plan | None = None
        self.batch_shares: list[int] = []
        self.shard_weights: list[float] = []
        self.history: list[dict] = []

    @classmethod
    def from_config(cls, model, cfg: HexaMoEConfig, ds_config: dict, options: PlanOptions | None = None, group=None,
                    world: int | None = None, rank: int | None = None) -> PlanState | None:
        """The plan state of ``model`` and, when profiles drive the run, its first plan; None when nothing is
        planned (``"profile": "uniform"`` without FSSDP re-plans, or no MoE layers). ``world``/``rank``
        default to the process group's. Raises :class:`ConfigError` naming the field for bad device files,
        wrong counts and infeasible plans."""
        if cfg.profile == "uniform" and not cfg.replans_fssdp:
            return None
        layers = moe_layers(model)
        if not layers:
            return None  # convert_model reports the missing experts
        if world is None:
            world = dist.get_world_size(group) if dist_on() else 1
            rank = dist.get_rank(group) if dist_on() else 0
        profiles = load_declared(cfg, world) if cfg.profile == "declared" else None  # before touching the GPU
        gb = global_micro_batch(ds_config, world)
        shape = model_shape_for(model)
        if cfg.profile == "measure":  # measured at the model's shapes; the data's sequence length after step 1
            profiles = resolve_profiles(cfg, world, rank or 0, group, shape=shape, micro_tokens=micro_tokens(shape, gb, world))
        state = cls(cfg, options or PlanOptions.from_config(cfg), shape, layers, gb, world, rank or 0, group, profiles)
        if state.drives_batches:
            state.stats = uniform_stats([n for n, _, _ in layers], [e for _, e, _ in layers], gb * shape.seq_len,
                                        [k for _, _, k in layers])
            if cfg.stats_path is not None and os.path.isfile(cfg.stats_path):
                state.take_stats(RoutingStats.load_json(cfg.stats_path), cfg.stats_path,
                                 f"hexamoe.stats_path ({cfg.stats_path})", reshape=False)
            state.apply(state.make(), step=0, initial=True)
        return state

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def local_batch(self) -> int:
        return self.batch_shares[self.rank]

    @property
    def weights_fixed(self) -> bool:
        """True when ``hexamoe.shard_weights`` is set: the plan's shard weights are then not applied."""
        return self.cfg.shard_weights is not None

    def fssdp_weights(self) -> list[float] | None:
        """The shard weights FSSDP shards with: the plan's, when it drives the run and none are set."""
        return list(self.shard_weights) if self.drives_batches and not self.weights_fixed else None

    def micro_tokens(self) -> int:
        return micro_tokens(self.shape, self.global_batch, self.world)

    def step_of(self, engine) -> int:
        """The step a re-plan asked for without one is recorded at: ``engine``'s optimizer steps, else the number
        of plans made so far."""
        return int(getattr(engine, "global_steps", len(self.history)))

    # -- planning -----------------------------------------------------------------------------------------
    def set_seq_len(self, seq: int) -> None:
        """Plan for samples of ``seq`` tokens from now on (the data's, once a batch showed it)."""
        self.shape = dataclasses.replace(self.shape, seq_len=seq)

    def take_stats(self, stats: RoutingStats, source: str, where: str = "replan(stats)", reshape: bool = True) -> None:
        """Plan from ``stats`` (summed over ranks) from now on; the shape takes their sequence length."""
        self.stats = match_layers(stats, self.layers, where)
        self.stats_source = source
        if reshape:
            self.shape = shape_for_stats(self.shape, self.stats, self.global_batch, self.world)

    def make(self) -> Plan:
        """A plan from the current inputs (a collective: rank 0's plan is broadcast)."""
        profiles = self.profiles
        if profiles is None:  # "uniform": declared entries, else this host measured once (no collective)
            profiles = resolve_profiles(self.cfg, self.world, self.rank, self.group, shape=self.shape,
                                        micro_tokens=self.micro_tokens())
        try:
            return make_plan(self.options, profiles, self.stats, self.shape, self.global_batch, group=self.group)
        except ConfigError as e:
            if not self.drives_batches:
                raise
            where = "hexamoe.devices_file" if self.cfg.devices_file else "hexamoe.devices"
            raise ConfigError(f"{where} (profile {self.cfg.profile!r}): no feasible plan for this model on these "
                              f"devices: {e}") from None

    def replan(self, stats: RoutingStats | None, profiles: Any = None, *, step: int, fssdp=None,
               source: str = "given") -> Plan:
        """The one re-plan path: take ``stats`` (summed over ranks; None: keep the current ones) and
        ``profiles`` (one per rank; None: keep), plan, and apply the plan: with FSSDP the plan's shard
        weights by migrating shards (when the plan drives the run and ``hexamoe.shard_weights`` is unset)
        and its modes and placements (unless every layer is data-centric); then its batch shares.
        A collective: every rank calls it at the same step boundary."""
        if stats is not None:
            self.take_stats(stats, source)
        if profiles is not None:
            self.profiles = as_profiles(profiles, self.world)
        plan = self.make()
        migration = None
        if fssdp is not None and self.fssdp_weights() is not None:
            migration = migrate_shards(fssdp, plan.shard_weights)
        self.apply(plan, step, migration=migration, fssdp=fssdp)
        return plan

    def apply(self, plan: Plan, step: int, initial: bool = False, migration: dict | None = None, fssdp=None) -> None:
        """Make ``plan`` the current one (FSSDP's modes and placements too), record it and report it."""
        if fssdp is not None and self.options.mode != "data_centric":
            fssdp.apply_plan(plan, check=False)  # every rank holds rank 0's plan (make_plan broadcasts it)
        self.plan = plan
        self.batch_shares = at_least_one(plan.batch_shares)
        self.shard_weights = list(plan.shard_weights)
        profiles = self.profiles or []
        rec = {"step": step, "batch_shares": list(self.batch_shares), "shard_weights": list(self.shard_weights),
               "predicted_step_s": plan.predicted.get("step_time"), "stats": self.stats_source,
               "devices": [p.to_dict() for p in profiles]}
        if migration is not None:
            rec["migration"] = migration
        self.history.append(rec)
        if self.rank == 0 and self.drives_batches:
            head = "initial plan" if initial else f"re-plan at step {step}"
            extra = ""
            if migration is not None:
                extra = (f"\n  FSSDP shards migrated: {migration['moved_experts']} experts moved; experts per rank "
                         f"{next(iter(migration['counts'].values()), [])} (first layer)")
            logger.info("%s\n%s%s", head, report(plan), extra)
            print(f"[ds-hexamoe] {head}\n{report(plan)}{extra}", flush=True)


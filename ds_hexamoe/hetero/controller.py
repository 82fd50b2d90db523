"""The runtime side of heterogeneous placement: profiles per rank, the plan, its batch shares and shard
weights, re-planning during training and the slowdown emulation.

``ds_hexamoe.initialize`` builds a :class:`HeteroController` (when ``hexamoe.profile`` is "measure" or
"declared") before converting or sharding anything, so infeasible inputs fail first; FSSDP then shards
with the plan's weights and the controller is attached to the engine's runtime as
``engine.hexamoe.hetero`` (``engine.hexamoe.plan`` is its current plan, ``engine.hexamoe.replan`` its
:meth:`HeteroController.replan`).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from ..config import ConfigError, HexaMoEConfig
from ..distributed import dist_on, host_all_reduce
from ..experts import RoutingStats, reduce_stats, stats_delta, uniform_stats
from ..fssdp.migrate import migrate_shards
from ..placement.plan import Plan
from ..placement.profiles import DeviceProfile, load_profiles
from ..placement.report import report
from ..placement.shapes import ModelShape
from .calibrate import CALIBRATION_LAPS, calibrated, calibration_factor, laps_under_plan
from .planning import (at_least_one, global_micro_batch, make_plan, micro_tokens, model_shape_for, moe_layers,
                       shape_for_stats)
from .resolve import load_declared, resolve_profiles
from .slowdown import install_clock

logger = logging.getLogger("ds_hexamoe.hetero")


# -------------------------------------------------------------------------------------- controller
class HeteroController:
    """Plan state of one engine: ``plan``, ``batch_shares``, ``shard_weights``, ``local_batch``; re-planning.

    Attributes a training loop reads: ``batch_shares`` (samples per rank of each global micro-batch, the
    same on all ranks), ``local_batch`` (this rank's), ``global_batch``; ``history`` lists every plan
    applied (step, shares, weights, experts migrated)."""

    def __init__(self, cfg: HexaMoEConfig, profiles: list[DeviceProfile], shape: ModelShape, layers, global_batch: int,
                 rank: int, world: int, group=None, stats: RoutingStats | None = None):
        self.cfg, self.profiles, self.shape, self.layers = cfg, profiles, shape, layers
        self.global_batch, self.rank, self.world, self.group = global_batch, rank, world, group
        self.stats = stats if stats is not None else uniform_stats(
            [n for n, _, _ in layers], [e for _, e, _ in layers], global_batch * shape.seq_len, [k for _, _, k in layers])
        self.stats_source = "uniform"
        self.plan: Plan | None = None
        self.batch_shares: list[int] = []
        self.shard_weights: list[float] = []
        self.history: list[dict] = []
        self.step_times: list[dict] = []
        self.clock = None
        self.runtime = None
        self.engine = None
        self._window_start: RoutingStats | None = None
        self._last_replan_step: int | None = None
        self._batch_seq: int | None = None  # the first batch's sequence length ("profile": "measure")
        self._seq_hook = None
        self.calibration: dict | None = None  # the rate factors calibrated online (.calibrate)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model, cfg: HexaMoEConfig, ds_config: dict, group=None) -> "HeteroController | None":
        """Profiles and the first plan for ``model`` (None for ``"profile": "uniform"``). Raises
        :class:`ConfigError` naming the field for bad device files, wrong counts and infeasible plans."""
        if cfg.profile == "uniform":
            return None
        layers = moe_layers(model)
        if not layers:
            return None  # convert_model reports the missing experts
        world = dist.get_world_size(group) if dist_on() else 1
        rank = dist.get_rank(group) if dist_on() else 0
        if cfg.profile == "declared":  # a file error is a config error: report it before touching the GPU
            profiles = load_declared(cfg, world)
        gb = global_micro_batch(ds_config, world)
        shape = model_shape_for(model)
        if cfg.profile != "declared":  # measured at the model's shapes; the data's sequence length after step 1
            profiles = resolve_profiles(cfg, world, rank, group, shape=shape,
                                        micro_tokens=micro_tokens(shape, gb, world))
        stats = None
        ctl = cls(cfg, profiles, shape, layers, gb, rank, world, group)
        if cfg.stats_path is not None and os.path.isfile(cfg.stats_path):
            stats = RoutingStats.load_json(cfg.stats_path)
            ctl.stats = ctl._match_layers(stats, f"hexamoe.stats_path ({cfg.stats_path})")
            ctl.stats_source = cfg.stats_path
        ctl._apply(ctl._make_plan(), step=0, initial=True)
        return ctl

    def _match_layers(self, stats: RoutingStats, where: str) -> RoutingStats:
        names = [n for n, _, _ in self.layers]
        if stats.layers == names:
            return stats
        if len(stats.layers) != len(names) or any(stats.num_experts(a) != e for a, (_, e, _) in zip(stats.layers, self.layers)):
            raise ConfigError(f"{where}: statistics of layers {stats.layers[:3]}... ({len(stats.layers)} layers) do not "
                              f"match this model's MoE layers {names[:3]}... ({len(names)}); profile this model")
        ren = dict(zip(stats.layers, names))  # same structure, other module prefix: map by call order
        return RoutingStats(names, {ren[l]: c for l, c in stats.counts.items()}, {ren[l]: t for l, t in stats.tokens.items()},
                            {ren[l]: k for l, k in stats.top_k.items()},
                            {(ren[a], ren[b]): m for (a, b), m in stats.affinity.items()}, stats.forwards, stats.model)

    @property
    def plan_mode(self) -> str:
        return self.cfg.mode

    def _make_plan(self) -> Plan:
        try:
            return make_plan(self.cfg, self.profiles, self.stats, self.shape, self.global_batch, mode=self.plan_mode,
                             group=self.group, rematerialize=self.cfg.rematerialize, prefetch=self.cfg.prefetch,
                             shard_by="speed")
        except ConfigError as e:
            where = "hexamoe.devices_file" if self.cfg.devices_file else "hexamoe.devices"
            raise ConfigError(f"{where} (profile {self.cfg.profile!r}): no feasible plan for this model on these "
                              f"devices: {e}") from None

    # -- applying ---------------------------------------------------------------------------------------
    @property
    def local_batch(self) -> int:
        return self.batch_shares[self.rank]

    @property
    def weights_fixed(self) -> bool:
        """True when ``hexamoe.shard_weights`` is set: the plan's shard weights are then not applied."""
        return self.cfg.shard_weights is not None

    def fssdp_weights(self) -> list[float] | None:
        return None if self.weights_fixed else list(self.shard_weights)

    def _apply(self, plan: Plan, step: int, initial: bool = False, migration: dict | None = None) -> None:
        self.plan = plan
        self.batch_shares = at_least_one(plan.batch_shares)
        self.shard_weights = list(plan.shard_weights)
        if self.runtime is not None:
            self.runtime.plan = plan
        rec = {"step": step, "batch_shares": list(self.batch_shares), "shard_weights": list(self.shard_weights),
               "predicted_step_s": plan.predicted.get("step_time"), "stats": self.stats_source,
               "devices": [p.to_dict() for p in self.profiles]}
        if migration is not None:
            rec["migration"] = migration
        self.history.append(rec)
        if self.rank == 0:
            head = "initial plan" if initial else f"re-plan at step {step}"
            extra = ""
            if migration is not None:
                extra = (f"\n  FSSDP shards migrated: {migration['moved_experts']} experts moved; experts per rank "
                         f"{next(iter(migration['counts'].values()), [])} (first layer)")
            logger.info("%s\n%s%s", head, report(plan), extra)
            print(f"[ds-hexamoe] {head}\n{report(plan)}{extra}", flush=True)

    def attach(self, runtime) -> None:
        """Hook into the engine's :class:`~ds_hexamoe.runtime.HexaMoERuntime` (``runtime.hetero``, ``.plan``,
        ``.replan``; a step hook for re-planning and step timing) and start the slowdown emulation."""
        self.runtime = runtime
        runtime.hetero = self
        runtime.plan = self.plan
        runtime.replan = self.replan
        runtime.step_hooks.append(self.step_hook)
        if self.cfg.profile == "measure" and getattr(runtime, "model", None) is not None:
            self._seq_hook = runtime.model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        if runtime.stats is not None:
            self._window_start = runtime.stats.snapshot()
        self.clock = install_clock(self.profiles, self.rank)
        fssdp = getattr(runtime, "fssdp", None)
        if fssdp is not None and self.cfg.mode != "data_centric" and hasattr(fssdp, "apply_plan"):
            fssdp.apply_plan(self.plan)

    # -- during training --------------------------------------------------------------------------------
    def step_hook(self, runtime, global_step: int) -> None:
        """After each optimizer step: record the step's busy/comm time (with the slowdown clock) and
        re-plan every ``placement.replan_every`` steps."""
        if self.clock is not None:
            lap = self.clock.lap()
            lap["step"] = int(global_step)
            self.step_times.append(lap)
            del self.step_times[:-1000]
        if self._seq_hook is not None:
            self._measure_at_batch_seq(global_step)
        elif self.clock is not None and self.cfg.profile == "measure" and self.calibration is None:
            self._calibrate_overhead(global_step)
        every = self.cfg.placement.replan_every
        if every and global_step % every == 0 and self._last_replan_step != global_step:
            self.replan(step=global_step)

    def _see_batch(self, _module, args, kwargs) -> None:
        """Forward pre-hook: the first batch's sequence length (token ids or embeddings ``[B, S, ...]``)."""
        if self._batch_seq is not None:
            return
        x = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if torch.is_tensor(kwargs.get(k))), None)
        if x is None and args and torch.is_tensor(args[0]) and not args[0].is_floating_point():
            x = args[0]  # positional token ids (pixel values are not a sequence)
        if x is not None and x.dim() >= 2:
            self._batch_seq = int(x.shape[1])

    def _measure_at_batch_seq(self, step: int) -> None:
        """After the first step (a collective): the ranks' longest first-batch sequence is the job's; when
        the profiles were measured at another, measure again at it and re-plan with them."""
        self._seq_hook.remove()
        self._seq_hook = None
        seq = int(self._all_reduce(torch.tensor([self._batch_seq or 0]), dist.ReduceOp.MAX)[0])
        if seq < 1 or seq == self.shape.seq_len:
            return
        self.shape = dataclasses.replace(self.shape, seq_len=seq)
        fresh = resolve_profiles(self.cfg, self.world, self.rank, self.group, shape=self.shape,
                                 micro_tokens=micro_tokens(self.shape, self.global_batch, self.world))
        self.replan(profiles=fresh, step=step)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """``t`` reduced over the group; ``t`` itself alone."""
        return host_all_reduce(t, op, self.group) if self.world > 1 else t

    def _calibrate_overhead(self, step: int) -> None:
        """Once, after ``CALIBRATION_LAPS`` steps under the current plan: every rank's measured busy time over
        the plan's prediction scales its profile's rates (:mod:`.calibrate`); re-plan with them (a collective,
        all ranks alike)."""
        laps = laps_under_plan(self.step_times, self.history[-1]["step"])
        if len(laps) < CALIBRATION_LAPS:
            return
        busy = [t["busy_s"] for t in laps[-CALIBRATION_LAPS:]]
        t = torch.zeros(self.world, dtype=torch.float64)
        t[self.rank] = calibration_factor(busy, self.plan.predicted["per_rank"]["busy"][self.rank])
        factors = [float(v) for v in self._all_reduce(t, dist.ReduceOp.SUM)]
        self.calibration = {"step": step, "steps": [laps[-CALIBRATION_LAPS]["step"], laps[-1]["step"]],
                            "factors": factors, "before_step_s": self.plan.predicted.get("step_time")}
        self.replan(profiles=[calibrated(p, f) for p, f in zip(self.profiles, factors)], step=step)

    def window_stats(self) -> RoutingStats | None:
        """Routing recorded by the runtime's collector since the last re-plan, summed over ranks (collective)."""
        c = getattr(self.runtime, "stats", None)
        if c is None:
            return None
        now = c.snapshot()
        if not now.layers:
            return None
        window = stats_delta(now, self._window_start)
        self._window_start = now
        window = reduce_stats(window, self.group)
        return window if sum(window.tokens.values()) > 0 else None

    def replan(self, stats: RoutingStats | None = None, profiles=None, step: int | None = None) -> Plan:
        """Plan again and apply it: new batch shares (next batch) and, with FSSDP and no explicit
        ``hexamoe.shard_weights``, the new shard weights by migrating shards (parameters, masters, optimizer
        state). A collective: every rank calls it at the same step boundary.

        ``stats``: routing statistics already summed over ranks (the Trainer callback's); None: the window
        since the last re-plan from the runtime's collector (all-reduced here); neither: the previous ones.
        ``profiles``: new device profiles (one per rank, anything ``load_profiles`` takes); None: the
        current ones, re-measured with ``"profile": "measure"`` (kept unless a speed moved by > 10%)."""
        if step is None:
            eng = self.engine
            step = int(getattr(eng, "global_steps", len(self.history)))
        self._last_replan_step = step
        if stats is None:
            stats = self.window_stats()
            source = f"window before step {step}"
        else:
            source = "given"
        if stats is not None:
            self.stats = self._match_layers(stats, "replan(stats)")
            self.stats_source = source
            self.shape = shape_for_stats(self.shape, self.stats, self.global_batch, self.world)
        if profiles is not None:
            new = load_profiles(profiles) if not (isinstance(profiles, list) and all(isinstance(p, DeviceProfile) for p in profiles)) else list(profiles)
            if len(new) != self.world:
                raise ConfigError(f"replan(profiles): got {len(new)} profiles for WORLD_SIZE={self.world}")
            self.profiles = new
            if self.clock is not None:  # the emulated device changed speed
                self.clock.set_factors(new[self.rank].slowdown, new[self.rank].expert_slowdown)
        elif self.cfg.profile == "measure":
            fresh = resolve_profiles(self.cfg, self.world, self.rank, self.group, shape=self.shape,
                                     micro_tokens=micro_tokens(self.shape, self.global_batch, self.world))
            # adopted when measured at other shapes (the name records them) or a speed moved by > 10%
            if any(a.name != b.name or abs(a.attn_tflops / b.attn_tflops - 1) > 0.1
                   or abs(a.expert_tflops / b.expert_tflops - 1) > 0.1 for a, b in zip(fresh, self.profiles)):
                self.profiles = fresh
                if self.calibration is not None:  # the micro-benchmark alone misses what calibration found
                    self.profiles = [calibrated(p, f) for p, f in zip(fresh, self.calibration["factors"])]
        plan = self._make_plan()
        migration = None
        fssdp = getattr(self.runtime, "fssdp", None)
        if fssdp is not None and not self.weights_fixed:
            migration = migrate_shards(fssdp, plan.shard_weights)
        if fssdp is not None and self.cfg.mode != "data_centric" and hasattr(fssdp, "apply_plan"):
            fssdp.apply_plan(plan)
        self._apply(plan, step, migration=migration)
        return plan

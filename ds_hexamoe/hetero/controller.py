"""The runtime side of heterogeneous placement: batch shares, re-planning during training, the slowdown
emulation, measured profiles at the data's sequence length and their online calibration.

``ds_hexamoe.initialize`` builds the job's :class:`~.state.PlanState` (profiles and the first plan, when
``hexamoe.profile`` is "measure" or "declared") before converting or sharding anything, so infeasible
inputs fail first; FSSDP then shards with the plan's weights, and the engine's
:class:`~ds_hexamoe.runtime.HexaMoERuntime` builds a :class:`HeteroController` over that state as
``engine.hexamoe.hetero``. The state owns the plan (``engine.hexamoe.plan``); every re-plan goes through
:meth:`~.state.PlanState.replan`.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..distributed import host_all_reduce
from ..experts import RoutingStats, reduce_stats, stats_delta
from ..placement.plan import Plan
from .calibrate import CALIBRATION_LAPS, calibrated, calibration_factor, laps_under_plan
from .resolve import resolve_profiles
from .slowdown import install_clock
from .state import PlanState

logger = logging.getLogger("ds_hexamoe.hetero")


class HeteroController:
    """Runs the plan of ``state`` during training: the step hook (step times under the slowdown clock,
    re-plans every ``placement.replan_every`` steps, measuring at the data's sequence length, calibration)
    and :meth:`replan`.

    What a training loop reads (all from the state, the plan's one owner): ``plan``, ``batch_shares``
    (samples per rank of each global micro-batch, the same on all ranks), ``local_batch`` (this rank's),
    ``global_batch``, ``shard_weights``, ``profiles``, ``history`` (every plan applied: step, shares,
    weights, experts migrated); its own: ``step_times`` and ``calibration``."""

    def __init__(self, state: PlanState, model=None, fssdp=None, collector=None, engine=None):
        """Hooks into a built engine: ``model`` (its first batch's sequence length, "profile": "measure"),
        ``fssdp`` (shards to migrate, modes to apply), ``collector`` (the runtime's routing statistics,
        for re-planning from the window since the last plan) and ``engine`` (its step count)."""
        self.state, self.fssdp, self.collector, self.engine = state, fssdp, collector, engine
        self.step_times: list[dict] = []
        self.calibration: dict | None = None  # the rate factors calibrated online (.calibrate)
        self._last_replan_step: int | None = None
        self._batch_seq: int | None = None  # the first batch's sequence length ("profile": "measure")
        self._seq_hook = None
        if state.cfg.profile == "measure" and model is not None:
            self._seq_hook = model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        self._window_start: RoutingStats | None = collector.snapshot() if collector is not None else None
        self.clock = install_clock(state.profiles, state.rank)
        if fssdp is not None and state.options.mode != "data_centric":
            fssdp.apply_plan(state.plan, check=False)  # sharded with this plan's weights; now its modes

    # -- the state's figures ----------------------------------------------------------------------------
    cfg = property(lambda self: self.state.cfg)
    plan = property(lambda self: self.state.plan)
    batch_shares = property(lambda self: self.state.batch_shares)
    shard_weights = property(lambda self: self.state.shard_weights)
    local_batch = property(lambda self: self.state.local_batch)
    global_batch = property(lambda self: self.state.global_batch)
    history = property(lambda self: self.state.history)
    profiles = property(lambda self: self.state.profiles)
    shape = property(lambda self: self.state.shape)
    stats = property(lambda self: self.state.stats)
    rank = property(lambda self: self.state.rank)
    world = property(lambda self: self.state.world)
    group = property(lambda self: self.state.group)

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
        self.state.set_seq_len(seq)
        fresh = resolve_profiles(self.cfg, self.world, self.rank, self.group, shape=self.shape,
                                 micro_tokens=self.state.micro_tokens())
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
        c = self.collector
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
        """Plan again and apply it (:meth:`PlanState.replan`): new batch shares (next batch) and, with FSSDP
        and no explicit ``hexamoe.shard_weights``, the new shard weights by migrating shards (parameters,
        masters, optimizer state). A collective: every rank calls it at the same step boundary.

        ``stats``: routing statistics already summed over ranks (the Trainer callback's); None: the window
        since the last re-plan from the runtime's collector (all-reduced here); neither: the previous ones.
        ``profiles``: new device profiles (one per rank, anything ``load_profiles`` takes); None: the
        current ones, re-measured with ``"profile": "measure"`` (kept unless a speed moved by > 10%)."""
        if step is None:
            step = self.state.step_of(self.engine)
        self._last_replan_step = step
        source = "given"
        if stats is None:
            stats = self.window_stats()
            source = f"window before step {step}"
        if stats is not None:  # first: a measurement below times the statistics' sequence length
            self.state.take_stats(stats, source)
        given = profiles is not None
        if not given and self.cfg.profile == "measure":
            profiles = self._fresh_measurement()
        plan = self.state.replan(None, profiles, step=step, fssdp=self.fssdp)
        if given and self.clock is not None:  # the emulated device changed speed
            mine = self.profiles[self.rank]
            self.clock.set_factors(mine.slowdown, mine.expert_slowdown)
        return plan

    def _fresh_measurement(self):
        """Profiles measured again (a collective); None keeps the current ones: adopted when measured at other
        shapes (the name records them) or a speed moved by > 10%, with the calibration found so far."""
        fresh = resolve_profiles(self.cfg, self.world, self.rank, self.group, shape=self.shape,
                                 micro_tokens=self.state.micro_tokens())
        if not any(a.name != b.name or abs(a.attn_tflops / b.attn_tflops - 1) > 0.1
                   or abs(a.expert_tflops / b.expert_tflops - 1) > 0.1 for a, b in zip(fresh, self.profiles)):
            return None
        if self.calibration is not None:  # the micro-benchmark alone misses what calibration found
            return [calibrated(p, f) for p, f in zip(fresh, self.calibration["factors"])]
        return fresh

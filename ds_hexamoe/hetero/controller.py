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
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError, HexaMoEConfig
from ..placement.model import ModelShape
from ..placement.plan import Plan
from ..placement.profiles import DeviceProfile, GB, load_profiles, measure_profile
from ..placement.stats import RoutingStats, reduce_stats, stats_delta, uniform_stats

logger = logging.getLogger("ds_hexamoe.hetero")


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------------------------------- model
def moe_layers(model) -> list[tuple[str, int, int]]:
    """``(name, num_experts, top_k)`` of every MoE experts module, in call order."""
    from ..integrations.transformers import experts_modules
    from ..fssdp.layer import module_weight_names

    cfg = getattr(model, "config", None)
    out = []
    for name, m in experts_modules(model):
        w = getattr(m, module_weight_names(m)["w1"])
        E = getattr(m, "num_experts", None) or w.size(0)
        k = getattr(m, "top_k", None) or getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", None) or 1
        out.append((name, int(E), int(k)))
    return out


def model_shape_for(model, seq_len: int | None = None) -> ModelShape:
    """The planner's :class:`ModelShape` of ``model``: from its transformers config when it has one, else
    from the experts' weight shapes; byte sizes follow the model's dtype (FSSDP keeps fp32 gradients
    and masters)."""
    from ..fssdp.layer import module_weight_names
    from ..integrations.transformers import experts_modules

    layers = moe_layers(model)
    mods = experts_modules(model)
    w1 = getattr(mods[0][1], module_weight_names(mods[0][1])["w1"])
    pbytes = w1.element_size()
    opt = 8 + (4 if w1.dtype != torch.float32 else 0)  # Adam moments (+ fp32 master)
    shape = None
    cfg = getattr(model, "config", None)
    if cfg is not None:
        try:
            shape = ModelShape.from_hf_config(cfg, seq_len=seq_len)
        except (ConfigError, TypeError):
            shape = None
    if shape is None or shape.num_moe_layers != len(layers) or shape.num_experts != layers[0][1]:
        has_gate = getattr(mods[0][1], "has_gate", True)
        d = w1.size(-1)
        f = w1.size(1) // (2 if has_gate else 1)
        if d > f * (2 if has_gate else 1):  # stored transposed ([E, d, 2f])
            d, f = w1.size(1), w1.size(-1) // (2 if has_gate else 1)
        dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in f".{n}")
        heads = getattr(cfg, "num_attention_heads", 1) or 1
        shape = ModelShape(hidden=int(d), expert_ffn=int(f), num_experts=layers[0][1], top_k=layers[0][2],
                           num_moe_layers=len(layers), seq_len=seq_len or 128, num_heads=int(heads), vocab_size=1,
                           gated=bool(has_gate), bias=bool(getattr(mods[0][1], "has_bias", False)))
        # the formula's dense part (2 * vocab * hidden + attention) replaced by the counted dense parameters
        shape.vocab_size = max(1, (dense - shape.dense_params + 2 * shape.hidden) // (2 * shape.hidden))
    return dataclasses.replace(shape, param_bytes=pbytes, grad_bytes=4, optimizer_bytes=opt)


# ---------------------------------------------------------------------------------------- profiles
def _declared_source(cfg: HexaMoEConfig) -> tuple[Any, str]:
    if cfg.devices_file is not None:
        return os.fspath(cfg.devices_file), f"hexamoe.devices_file ({cfg.devices_file})"
    return [dataclasses.asdict(d) for d in cfg.devices], "hexamoe.devices"


def _load_declared(cfg: HexaMoEConfig, world: int) -> list[DeviceProfile]:
    src, where = _declared_source(cfg)
    try:
        profiles = load_profiles(src)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"hexamoe.{msg}" if msg.startswith("devices") and where == "hexamoe.devices"
                          else f"{where}: {msg}") from None
    if len(profiles) != world:
        raise ConfigError(f"{where}: got {len(profiles)} device profiles for WORLD_SIZE={world}; give one entry per "
                          'rank (or entries with "count" in a devices_file) adding up to the number of ranks')
    return profiles


def _measure_local(cfg: HexaMoEConfig, rank: int, world: int) -> DeviceProfile:
    """This rank's measured profile; a ``devices`` entry for the rank overrides measured numbers it sets."""
    override = None
    if cfg.devices is not None:
        if len(cfg.devices) not in (1, world):
            raise ConfigError(f"hexamoe.devices: got {len(cfg.devices)} entries for WORLD_SIZE={world} with "
                              '"profile": "measure"; give one entry (all ranks) or one per rank, or none')
        override = cfg.devices[rank if len(cfg.devices) == world else 0]
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    prof = measure_profile(dev, slowdown=override.slowdown if override is not None else 1.0)
    if dev.type == "cpu":  # ranks on one host share its memory
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        prof.memory_bytes = int(prof.memory_bytes // max(1, local_world))
    if override is not None:
        if override.tflops is not None:
            prof.attn_tflops = prof.expert_tflops = override.tflops
        if override.memory_gb is not None:
            prof.memory_bytes = int(override.memory_gb * GB)
        if override.bandwidth_gbps is not None:
            prof.bandwidth_gbps = override.bandwidth_gbps
        if override.step_overhead_s:
            prof.step_overhead_s = override.step_overhead_s
        if override.memory_bandwidth_gbps is not None:
            prof.memory_bandwidth_gbps = override.memory_bandwidth_gbps
        if override.name != "cpu":
            prof.name = override.name
    return prof


def resolve_profiles(cfg: HexaMoEConfig, world: int, rank: int, group=None) -> list[DeviceProfile]:
    """One profile per rank for ``hexamoe.profile`` "declared" or "measure" (a collective for "measure")."""
    if cfg.profile == "declared":
        return _load_declared(cfg, world)
    if cfg.profile == "measure":
        from ..placement.profiles import gather_profiles, measure_latency

        local = _measure_local(cfg, rank, world)
        if _dist_on() and world > 1:  # every rank measures (a collective), a declared value then wins
            dev = "cuda" if torch.cuda.is_available() and dist.get_backend(group) == "nccl" else "cpu"
            local.latency_us = measure_latency(group, device=dev)
        declared = cfg.devices[rank if len(cfg.devices) == world else 0].latency_us if cfg.devices else None
        if declared is not None:
            local.latency_us = declared
        return gather_profiles(local, group=group)
    raise ConfigError(f'hexamoe.profile: got {cfg.profile!r}; the controller plans only for "measure" or "declared"')


def _global_batch(ds_config: dict, world: int) -> int:
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if micro is None and ds_config.get("train_batch_size") is not None:
        micro = int(ds_config["train_batch_size"]) // (int(ds_config.get("gradient_accumulation_steps", 1)) * world)
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"train_micro_batch_size_per_gpu: got {micro!r}; heterogeneous planning splits "
                          "train_micro_batch_size_per_gpu * WORLD_SIZE samples per micro-step over the ranks (set it)")
    return micro * world


def _at_least_one(shares: list[int]) -> list[int]:
    """Every rank runs every step: a rank the plan left without samples gets one from the largest share."""
    s = list(shares)
    for r in range(len(s)):
        if s[r] == 0:
            big = max(range(len(s)), key=lambda q: s[q])
            if s[big] <= 1:
                raise ConfigError(f"train_micro_batch_size_per_gpu: the global micro-batch ({sum(s)} samples) is too "
                                  f"small to give each of {len(s)} ranks a sample; raise it")
            s[big] -= 1
            s[r] += 1
    return s


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
        world = dist.get_world_size(group) if _dist_on() else 1
        rank = dist.get_rank(group) if _dist_on() else 0
        if cfg.profile == "declared":  # a file error is a config error: report it before touching the GPU
            profiles = _load_declared(cfg, world)
        else:
            profiles = resolve_profiles(cfg, world, rank, group)
        gb = _global_batch(ds_config, world)
        shape = model_shape_for(model)
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
        from ..placement.planner import plan as make_plan

        p = self.cfg.placement
        try:
            out = make_plan(self.profiles, self.stats, global_batch=self.global_batch, model_shape=self.shape,
                            solver=p.solver, replicas=p.replicas or None, time_limit=p.ilp_time_limit,
                            mode=self.plan_mode, use_affinity=p.use_affinity, rematerialize=self.cfg.rematerialize,
                            prefetch=self.cfg.prefetch, shard_by="speed")
        except ConfigError as e:
            where = "hexamoe.devices_file" if self.cfg.devices_file else "hexamoe.devices"
            raise ConfigError(f"{where} (profile {self.cfg.profile!r}): no feasible plan for this model on these "
                              f"devices: {e}") from None
        if _dist_on() and self.world > 1:  # the planner is deterministic; rank 0's plan is the one applied
            box = [out.to_dict() if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
            out = Plan.from_dict(box[0])
        return out

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
        self.batch_shares = _at_least_one(plan.batch_shares)
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
            from ..placement.cli import report

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
        if runtime.stats is not None:
            self._window_start = runtime.stats.snapshot()
        if any(p.slowdown > 1.0 for p in self.profiles):
            from .slowdown import CollectiveClock

            self.clock = CollectiveClock(self.profiles[self.rank].slowdown).install()
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
        every = self.cfg.placement.replan_every
        if every and global_step % every == 0 and self._last_replan_step != global_step:
            self.replan(step=global_step)

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
            # the training sequence length, from tokens per forward (each forward is one rank's micro-batch)
            tok = max(self.stats.tokens.values()) if self.stats.tokens else 0
            if tok and self.stats.forwards > 0:
                seq = round(tok * self.world / (self.stats.forwards * self.global_batch))
                if seq >= 1 and seq != self.shape.seq_len:
                    self.shape = dataclasses.replace(self.shape, seq_len=int(seq))
        if profiles is not None:
            new = load_profiles(profiles) if not (isinstance(profiles, list) and all(isinstance(p, DeviceProfile) for p in profiles)) else list(profiles)
            if len(new) != self.world:
                raise ConfigError(f"replan(profiles): got {len(new)} profiles for WORLD_SIZE={self.world}")
            self.profiles = new
            if self.clock is not None:  # the emulated device changed speed
                self.clock.slowdown = float(new[self.rank].slowdown)
        elif self.cfg.profile == "measure":
            fresh = resolve_profiles(self.cfg, self.world, self.rank, self.group)
            if any(abs(a.attn_tflops / b.attn_tflops - 1) > 0.1 or abs(a.expert_tflops / b.expert_tflops - 1) > 0.1
                   for a, b in zip(fresh, self.profiles)):
                self.profiles = fresh
        plan = self._make_plan()
        migration = None
        fssdp = getattr(self.runtime, "fssdp", None)
        if fssdp is not None and not self.weights_fixed:
            from ..fssdp.migrate import migrate_shards

            migration = migrate_shards(fssdp, plan.shard_weights)
        if fssdp is not None and self.cfg.mode != "data_centric" and hasattr(fssdp, "apply_plan"):
            fssdp.apply_plan(plan)
        self._apply(plan, step, migration=migration)
        return plan

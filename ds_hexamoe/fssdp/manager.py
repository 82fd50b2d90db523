"""FSSDPManager: fully sharded expert parameters, materialized sparsely per layer and step.

Usage (what ``ds_hexamoe.initialize`` does)::

    manager = FSSDPManager.shard_model(model, hexamoe_cfg)     # after dist init, before deepspeed.initialize
    dense = [p for p in model.parameters() if p.requires_grad and not manager.owns(p)]
    engine, opt, dl, sched = deepspeed.initialize(..., model=model, model_parameters=dense)
    manager.attach(engine, optimizer_config=ds_config.get("optimizer"), lr_scheduler=sched)

The manager holds one component per job (docs/design.md, "FSSDP") and wires them to the model:
``store`` (:class:`~.shard_store.ShardStore`: shards, ownership, fp32 gradients), ``materializer``
(:class:`~.materializer.Materializer`: the cache, gathers, re-gather, gradient reduce-scatters),
``gathers`` (:class:`~.schedule.GatherSchedule`: load history, predicted gathers), ``mode_table``
(:class:`~.mode_table.ModeTable`: per-layer modes, placements, speeds), ``telemetry``
(:class:`~.telemetry.StepTelemetry`: CommStats, token accounting) and ``binding``
(:class:`~.deepspeed_hooks.EngineBinding`: the sharded optimizer and the DeepSpeed engine).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import HexaMoEConfig
from ..experts import state_of
from .deepspeed_hooks import EngineBinding
from .layer import ExpertLayer
from .materializer import Materializer
from .mode_table import ModeTable
from .optim import ShardedOptimizer
from .schedule import GatherSchedule, ranks_per_node
from .shard_store import ShardStore
from .sharding import shard_layers
from .telemetry import StepTelemetry


class FSSDPManager:
    """Owns the expert shards of every MoE layer of one model on this rank (see module docstring)."""

    def __init__(self, model: nn.Module, layers: list[ExpertLayer], cfg: HexaMoEConfig, group, speeds=None):
        self.model, self.cfg = model, cfg
        self.store = ShardStore(layers, group)
        self.telemetry = StepTelemetry()
        # two slots: backward prefetch, or the next layer's predicted gather (hecate) beside the current one
        two = (cfg.prefetch and cfg.rematerialize) or cfg.fssdp.schedule == "hecate" or cfg.mode == "hecate"
        self.materializer = Materializer(self.store, self.telemetry, rematerialize=cfg.rematerialize,
                                         prefetch=cfg.prefetch, fanout=cfg.fssdp.fanout, num_slots=2 if two else 1)
        self.gathers = GatherSchedule(cfg.fssdp, model, self.store, self.materializer, self.telemetry,
                                      lambda index: self.mode_table.mode(index), placements_ahead=cfg.mode in ("hecate", "auto"))
        self.mode_table = ModeTable(cfg, self.store, self.materializer, self.telemetry, self.gathers, speeds=speeds)
        self.binding = EngineBinding()
        self.last_reown: dict | None = None  # summary of the last load-aware re-ownership
        for layer in layers:
            self._install(layer)

    @classmethod
    def shard_model(cls, model: nn.Module, cfg: HexaMoEConfig, group=None, speeds=None) -> FSSDPManager:
        """Replace every experts module's full 3-D parameters by this rank's whole-expert shards.

        ``speeds``: relative per-rank speeds sizing the model-centric hidden slices (None: equal)."""
        layers, group = shard_layers(model, cfg, group)
        return cls(model, layers, cfg, group, speeds=speeds)

    def _install(self, layer: ExpertLayer) -> None:
        # the module's forward dispatches on the layer's mode; data-centric weights come from the gathers
        module = layer.module
        state = state_of(module)
        state.weights = functools.partial(self.gathers.provide, layer)
        state.fssdp_layer = layer
        inner = module.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            mode = self.mode_table.mode(layer.index)
            run = inner if mode == "data_centric" else functools.partial(self.mode_table.run, layer, mode)
            with self.materializer.saved_tensors_hooks():
                return run(*args, **kwargs)

        module.forward = forward

    # ------------------------------------------------------------------------------ shards and gradients
    layers = property(lambda self: self.store.layers)
    group = property(lambda self: self.store.group)
    rank = property(lambda self: self.store.rank)
    world_size = property(lambda self: self.store.world_size)
    grads = property(lambda self: self.store.grads)

    def owns(self, p: torch.Tensor) -> bool:
        """True for the expert shard parameters FSSDP steps itself (keep them out of DeepSpeed's optimizer)."""
        return self.store.owns(p)

    def shard_parameters(self) -> list[nn.Parameter]:
        return self.store.shard_parameters()

    def synchronize(self) -> None:
        """Finish every asynchronous gradient reduce-scatter still in flight."""
        self.materializer.synchronize()

    @property
    def pending_reduces(self) -> int:
        """Gradient reduce-scatters issued and not finished yet (``synchronize`` finishes them)."""
        return self.materializer.pending_reduces

    def zero_grad(self) -> None:
        self.store.zero_grads()

    def expert_grad_sq_norm(self) -> torch.Tensor:
        """Global squared norm of the expert gradients (disjoint shards: a sum over ranks); a collective."""
        self.synchronize()
        return self.store.grad_sq_norm(self.stats)

    def expert_grads_overflow(self) -> bool:
        self.synchronize()
        return self.store.grads_overflow(self.stats)

    def rebuild_shards(self, new_owns, new_rows) -> None:
        """Shards on the ownership ``new_owns`` (one per layer) from ``new_rows`` (see
        :meth:`ShardStore.rebuild`); every cache built on the old owners is dropped."""
        self.store.rebuild(new_owns, new_rows)
        self.binding.shards_replaced()
        self.materializer.forget_calls()
        self.gathers.drop_ahead()
        self.mode_table.forget_layouts()

    def reown(self) -> dict:
        """Load-aware re-ownership (Hecate's heterogeneous sharding) of every layer with a load window, each
        rank keeping its number of experts; shards move with their optimizer state. A collective, between
        optimizer steps; ``fssdp.reshard_every`` calls it. Returns :func:`.migrate.migrate_to`'s summary."""
        from .migrate import migrate_to

        return migrate_to(self, self.gathers.load_aware_ownerships(ranks_per_node(self.world_size)))

    def load_history(self) -> dict[int, list[list[list[int]]]]:
        """``{layer index: [expert loads [N][E] per call]}`` in each layer's prediction window."""
        return self.gathers.load_history()

    @property
    def prediction_budgets(self) -> dict[int, list[int | None]]:
        """Per layer, every rank's last ``fssdp.budget: "auto"`` budget."""
        return self.gathers.prediction_budgets

    # --------------------------------------------------------------------------- optimizer and engine
    optimizer = property(lambda self: self.binding.optimizer)
    engine = property(lambda self: self.binding.engine)

    def build_optimizer(self, spec) -> ShardedOptimizer:
        return self.binding.build_optimizer(self.store.shards_by_key(), self.grads, spec)

    def attach(self, engine, optimizer_config: dict | None = None, lr_scheduler=None) -> None:
        """Drive the shards from ``engine``: step, global clipping, LR schedule, zero_grad, checkpoints."""
        self.binding.attach(self, engine, optimizer_config=optimizer_config, lr_scheduler=lr_scheduler)
        self.materializer.engine_driven = True

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict with full experts (a collective); ``{}`` on other ranks when ``rank0_only``."""
        from .checkpoint import full_state_dict

        return full_state_dict(self, rank0_only=rank0_only)

    # -------------------------------------------------------------------------------- modes and plans
    def modes(self) -> dict[str, str]:
        """``{layer name: mode}`` in effect for the next forward."""
        return self.mode_table.modes()

    def set_modes(self, modes, *, check: bool = True) -> None:
        self.mode_table.set_modes(modes, check=check)

    def placement(self, which) -> dict[int, list[int]]:
        return self.mode_table.placement(which)

    def set_placement(self, which, placement=None, *, check: bool = True) -> None:
        self.mode_table.set_placement(which, placement, check=check)

    def set_speeds(self, speeds=None, *, check: bool = True) -> None:
        self.mode_table.set_speeds(speeds, check=check)

    def apply_plan(self, plan, *, check: bool = True) -> None:
        self.mode_table.apply_plan(plan, check=check)

    # ------------------------------------------------------------------------------------ accounting
    stats = property(lambda self: self.telemetry.stats)

    def comm_stats(self) -> dict:
        """Bytes this rank sent since the last optimizer step (``last_step_comm_stats()``: the step before).

        With expert-parallel / model-centric layers, ``token_bytes`` (their token all-to-alls, all-gathers and
        reduce-scatters, forward and backward) is added and counted in ``total``; with LSH on,
        ``lsh_compression`` (rows sent / pairs bound to other ranks, mean over calls) too.
        """
        return self.telemetry.comm_stats()

    def last_step_comm_stats(self) -> dict:
        return self.telemetry.last_step_comm_stats()

    def accounting_summary(self, last_step: bool = True) -> dict:
        """Token accounting and bytes per collective of the expert-parallel / model-centric layers, with the
        FSSDP weight traffic beside them (``last_step``: the last completed optimizer step, else the current)."""
        return self.telemetry.accounting_summary([layer.name for layer in self.layers], self.modes(),
                                                 self.mode_table.replicated_experts(), last_step=last_step)

    def memory_stats(self) -> dict[str, int]:
        """Bytes of expert state this rank holds: shards, fp32 grads/masters/optimizer state, and the cache."""
        out = {"shard_param_bytes": self.store.param_bytes(), "cache_bytes": self.materializer.cache.nbytes()}
        if self.optimizer is not None:
            out.update(self.optimizer.nbytes())
        else:
            out["grad_bytes"] = self.store.grad_bytes()
        out["expert_state_bytes"] = sum(v for k, v in out.items() if k != "cache_bytes")
        return out

"""FSSDPManager: fully sharded expert parameters, materialized sparsely per layer and step.

Usage (what ``ds_hexamoe.initialize`` does)::

    manager = FSSDPManager.shard_model(model, hexamoe_cfg)     # after dist init, before deepspeed.initialize
    dense = [p for p in model.parameters() if p.requires_grad and not manager.owns(p)]
    engine, opt, dl, sched = deepspeed.initialize(..., model=model, model_parameters=dense)
    manager.attach(engine, optimizer_config=ds_config.get("optimizer"), lr_scheduler=sched)

The manager is composed of one mixin per job (docs/design.md, "FSSDP"): :mod:`.sharding` (ownership,
shards, state-dict hooks), :mod:`.materialize` (the weights provider and its transfers), :mod:`.backward`
(re-gather, prefetch, gradient reduction), :mod:`.schedule` (Hecate's predicted gathers), :mod:`.switching` (execution modes and plans) and :mod:`.glue`
(optimizer, accounting, checkpoints).
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..config import HexaMoEConfig
from .backward import BackwardMixin
from .cache import CallRecord, PipelineCache
from .collectives import CommStats, Pending
from .glue import GlueMixin
from .layer import ExpertLayer
from .materialize import MaterializeMixin
from .optim import ShardedOptimizer
from .schedule import ScheduleMixin
from .sharding import ShardingMixin
from .switching import SwitchingMixin


class FSSDPManager(ShardingMixin, MaterializeMixin, ScheduleMixin, BackwardMixin, SwitchingMixin, GlueMixin):
    """Owns the expert shards of every MoE layer of one model on this rank (see module docstring)."""

    def __init__(self, model: nn.Module, layers: list[ExpertLayer], cfg: HexaMoEConfig, group, speeds=None):
        self.model, self.layers, self.cfg, self.group = model, layers, cfg, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.rematerialize, self.prefetch = cfg.rematerialize, cfg.prefetch
        numel = max((layer.full_numel for layer in layers), default=0)
        # two slots: backward prefetch, or the next layer's predicted gather (hecate) beside the current one
        two = (self.prefetch and self.rematerialize) or cfg.fssdp.schedule == "hecate"
        self.cache = PipelineCache(numel=numel, num_slots=2 if two else 1)
        self.stats, self.last_step_stats = CommStats(), CommStats()
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self.optimizer: ShardedOptimizer | None = None
        self.engine = None
        self._index_shards()
        self._forward_record: CallRecord | None = None
        self._records: list[weakref.ref] = []
        self._seq = 0
        self._bwd_turn = 0
        self._pending: list[Pending] = []
        self._callback_queued = False
        self._scaled_norm = None  # set by the norm hook during engine.step
        self._init_modes(cfg, speeds)
        self._init_schedule(cfg)
        for layer in layers:
            self._install(layer)

    def _init_modes(self, cfg: HexaMoEConfig, speeds) -> None:
        # per layer, switchable between steps (docs/design.md, "Execution modes")
        from ..parallel.accounting import TokenAccounting

        initial = "data_centric" if cfg.mode == "auto" else cfg.mode
        self._modes: dict[int, str] = {layer.index: initial for layer in self.layers}
        self._placements: dict[int, dict[int, list[int]]] = {}
        self._moes: dict[tuple[int, str], object] = {}
        self._slice_plans: dict = {}
        self._transfers: dict = {}
        self._speeds: list[float] | None = None if speeds is None else [float(v) for v in speeds]
        self.accounting = TokenAccounting(history=1 << 16)
        self._last_step_calls: list = []
        self.plan = None  # the last plan applied (apply_plan)

"""Per-engine HexaMoE state: the config, the experts modules, FSSDP (when on), the plan and the step metrics.

Built by :func:`ds_hexamoe.initialize` as ``engine.hexamoe``, with everything it needs; the training
worker, the progress bar, the Trainer callback and the logs all read :meth:`HexaMoERuntime.metrics`.
The current placement plan has one owner, the job's :class:`~ds_hexamoe.hetero.state.PlanState`
(``runtime.planning``): ``runtime.plan`` reads it and ``runtime.replan`` is the one way to change it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import HexaMoEConfig
from .experts import attach_collector, balance, experts_modules, state_of
from .hetero.controller import HeteroController
from .hetero.state import PlanState


class HexaMoERuntime:
    """``planning``: the job's plan state (None: nothing is planned); with device profiles the runtime runs
    it through a :class:`~ds_hexamoe.hetero.HeteroController` (``hetero``) hooked to ``model``, ``fssdp``, its
    routing collector and ``engine``."""

    def __init__(self, model: nn.Module, config: HexaMoEConfig, fssdp: Any | None = None,
                 planning: PlanState | None = None, engine: Any | None = None):
        self.model = model
        self.config = config
        self.fssdp = fssdp
        self.planning = planning
        self.engine = engine
        self.experts = experts_modules(model)
        self.step_hooks: list = []  # called as hook(runtime, global_step) after each optimizer step
        self.stats = None
        if config.collect_stats:
            # shares a collector someone already attached (the Trainer callback), never replaces it
            self.stats = attach_collector(model, affinity=config.placement.use_affinity)
            # one forward boundary per micro-batch, so re-materialized layers are not counted twice
            model.register_forward_pre_hook(lambda _module, _args: self.stats.step())
        for _, m in self.experts:
            state_of(m).runtime = self
        self.hetero: HeteroController | None = None  # the heterogeneous-placement controller (ds_hexamoe.hetero)
        if planning is not None and planning.drives_batches:
            self.hetero = HeteroController(planning, model=model, fssdp=fssdp, collector=self.stats, engine=engine)
            self.step_hooks.append(self.hetero.step_hook)

    @property
    def plan(self):
        """The current placement plan (None before the first one)."""
        return self.planning.plan if self.planning is not None else None

    def expert_load(self) -> dict[str, list[int]]:
        """Tokens per expert of each MoE layer in the last forward (one host sync for all layers)."""
        names, counts = [], []
        for name, m in self.experts:
            c = state_of(m).last_counts
            if c is not None:
                names.append(name)
                counts.append(c)
        if not counts:
            return {}
        return {n: c.tolist() for n, c in zip(names, torch.stack([c.cpu() for c in counts]))}

    def metrics(self) -> dict[str, Any]:
        """Expert load and balance (max/mean tokens per expert, 1.0 is perfect), bytes moved, dropped tokens."""
        load = self.expert_load()
        out: dict[str, Any] = {"dropped_tokens": 0}
        if load:
            b = balance(load)
            out["balance"] = b["overall"]
            out["balance_per_layer"] = b["per_layer"]
            out["expert_load"] = load
        # counters reset at each optimizer step: report the last completed step
        comm = self.fssdp.last_step_comm_stats() if self.fssdp is not None else {}
        out["comm_bytes"] = int(sum(v for k, v in comm.items() if k.endswith("bytes"))) if comm else 0
        if comm:
            out["comm"] = comm
        if self.fssdp is not None:
            out["moe_accounting"] = self.fssdp.accounting_summary()
        return out

    def replan(self, stats=None, profiles=None, step: int | None = None):
        """Plan again from fresh routing statistics (and profiles) and apply it: batch shares, shards, modes
        (:meth:`PlanState.replan`; a collective). Without device profiles (FSSDP's ``"mode": "auto"`` or
        replicas) it needs ``stats`` and returns None without them, or when nothing is planned."""
        if self.hetero is not None:
            return self.hetero.replan(stats, profiles=profiles, step=step)
        if self.planning is None or self.fssdp is None or stats is None or not stats.layers:
            return None
        if step is None:
            step = self.planning.step_of(self.engine)
        return self.planning.replan(stats, profiles, step=step, fssdp=self.fssdp)

    def after_step(self, global_step: int) -> None:
        for hook in self.step_hooks:
            hook(self, global_step)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """A full (unsharded) state dict for Hugging Face export; with FSSDP this gathers the experts."""
        if self.fssdp is not None:
            return self.fssdp.full_state_dict()
        return self.model.state_dict()


def runtime_of(model: nn.Module) -> HexaMoERuntime | None:
    """The runtime driving ``model``'s experts modules (set by :func:`ds_hexamoe.initialize`), or None."""
    for _, m in experts_modules(model):
        if state_of(m).runtime is not None:
            return state_of(m).runtime
    return None

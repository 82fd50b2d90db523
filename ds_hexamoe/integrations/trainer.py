"""``HexaMoECallback``: expert-load, balance, auxiliary-loss and traffic figures in the Hugging Face Trainer.

Use with a DeepSpeed config file that has a ``"hexamoe"`` section (``import ds_hexamoe`` routes the
Trainer's ``deepspeed.initialize`` through HexaMoE)::

    trainer = Trainer(model, TrainingArguments(..., deepspeed="ds_config.json"), ...)
    HexaMoECallback().attach(trainer)      # or Trainer(..., callbacks=[HexaMoECallback()])
    trainer.train()

Every ``logging_steps`` it adds to the Trainer's ``logs`` (so every logger, TensorBoard included, gets them):
``moe/balance`` (busiest expert / mean load, averaged over layers; 1.0 is perfect), ``moe/balance/<layer>``,
``moe/load/<layer>/e<i>`` (fraction of the layer's assignments; for ``E <= per_expert_max``),
``moe/load_max/<layer>`` and ``moe/load_min/<layer>``, ``moe/tokens`` (tokens through the MoE layers), ``moe/aux_loss``
(mean over the window's forwards) and ``moe/comm_bytes`` (the runtime's bytes moved). Loads are summed
over all ranks and cover the forwards since the previous log. Every ``placement.replan_every`` optimizer
steps it calls the runtime's ``replan(stats)`` when it has one (and ``on_replan(stats, step)`` if given);
``on_save`` writes the routing statistics (all ranks summed) as ``hexamoe_routing_stats.json`` into the
checkpoint folder.

With ``hexamoe.router`` options (the section's ``"router"`` or the ``router`` argument) on a Hugging Face MoE
model it also applies them (:mod:`.trainer_router`: aux coefficient, z-loss, DeepSeek-V3 bias update after each
optimizer step, freeze) and logs ``router/z_loss`` and, per MoE block, ``router/imbalance|entropy|aux_loss|
z_loss/<layer>`` and ``router/load/<layer>/e<i>``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from ..config import HexaMoEConfig, RouterConfig, hexamoe_section, load_ds_config
from ..distributed import dist_on, host_all_reduce
from ..experts import (RoutingStats, RoutingStatsCollector, attach_collector, balance, collector_of, detach_collector,
                       reduce_stats, stats_delta)
from ..layers import moe_aux_loss
from ..runtime import HexaMoERuntime, runtime_of
from .trainer_router import TrainerRouter, parse_router

logger = logging.getLogger(__name__)
STATS_FILE = "hexamoe_routing_stats.json"


def _global_stats(collector: RoutingStatsCollector, reduce: bool) -> RoutingStats:
    """The collector's statistics, summed over all ranks when ``reduce`` (the collector is unchanged)."""
    snap = collector.snapshot()
    return reduce_stats(snap) if reduce and snap.layers else snap


class HexaMoECallback(TrainerCallback):
    """Trainer callback for MoE figures, re-planning and routing statistics (see the module docstring).

    Args:
        replan_every: override of ``hexamoe.placement.replan_every`` (0: never).
        on_replan: optional ``fn(stats: RoutingStats, global_step)`` called at every re-plan.
        per_expert_max: log one load figure per expert for layers with at most this many experts.
        all_ranks: sum the figures over ranks (collective calls inside ``on_log``/``on_save``).
        router: ``hexamoe.router`` options (dict or RouterConfig) replacing the config section's.
    """

    def __init__(self, replan_every: int | None = None, on_replan: Callable[[RoutingStats, int], Any] | None = None,
                 per_expert_max: int = 16, all_ranks: bool = True, router: dict | RouterConfig | None = None):
        if replan_every is not None and (not isinstance(replan_every, int) or replan_every < 0):
            raise ValueError(f"replan_every: got {replan_every!r}; expected an integer >= 0 (0: never)")
        if per_expert_max < 0:
            raise ValueError(f"per_expert_max: got {per_expert_max!r}; expected an integer >= 0")
        self.replan_every = replan_every
        self.on_replan = on_replan
        self.per_expert_max = per_expert_max
        self.all_ranks = all_ranks
        self.router_config = None if router is None else parse_router(router)
        self.router: TrainerRouter | None = None
        self.replans = 0
        self._trainer = None
        self._model = None
        self._config: HexaMoEConfig | None = None
        self._collector: RoutingStatsCollector | None = None
        self._owns_collector = False
        self._window_start: RoutingStats | None = None
        self._aux_sum: torch.Tensor | None = None
        self._aux_n = 0
        self._hook = None
        self._fallback_runtime = None
        self._warned_replan = False

    def attach(self, trainer) -> "HexaMoECallback":
        """Add to ``trainer`` first in line (so the loggers called after it, TensorBoard included, see the
        figures) and keep a handle on it (to reach the DeepSpeed engine's HexaMoE runtime)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._trainer = trainer
        self._setup_router(trainer.args, trainer.model, trainer.optimizer)
        return self

    def _setup_router(self, args, model, optimizer, late: bool = False) -> None:
        """Apply the ``hexamoe.router`` options, once, when the callback first sees the model (freeze before the
        optimizer exists), and bind the z-loss to the Trainer when it is known."""
        if self.router is None and model is not None:
            cfg = self.router_config
            if cfg is None:
                section = load_ds_config(getattr(args, "deepspeed", None)).get("hexamoe") or {}
                cfg = parse_router(section["router"]) if "router" in section else None
            if cfg is not None:
                self.router = TrainerRouter(model, cfg, optimizer, late)
        if self.router is not None and self._trainer is not None:
            self.router.bind(self._trainer)

    # -- lookups --------------------------------------------------------------------------------------
    def runtime(self):
        """The engine's ``HexaMoERuntime`` (``engine.hexamoe``), or a local one over the model's experts."""
        for obj in (getattr(self._trainer, "model_wrapped", None), getattr(self._trainer, "deepspeed", None),
                    self._model):
            rt = getattr(obj, "hexamoe", None) or (runtime_of(obj) if isinstance(obj, torch.nn.Module) else None)
            if rt is not None:
                return rt
        if self._fallback_runtime is None and self._model is not None:
            self._fallback_runtime = HexaMoERuntime(self._model, self.config)
        return self._fallback_runtime

    @property
    def config(self) -> HexaMoEConfig:
        if self._config is None:
            self._config = HexaMoEConfig()
        return self._config

    def _resolve_config(self, args) -> None:
        rt = None
        for obj in (getattr(self._trainer, "model_wrapped", None), self._model):
            rt = rt or getattr(obj, "hexamoe", None) or (runtime_of(obj) if isinstance(obj, torch.nn.Module) else None)
        if rt is not None and getattr(rt, "config", None) is not None:
            self._config = rt.config
            return
        ds = getattr(args, "deepspeed", None)
        if ds is not None:
            self._config = hexamoe_section(load_ds_config(ds))
        self._config = self._config or HexaMoEConfig()

    # -- Trainer events -------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._setup_router(args, model, optimizer)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model if model is not None else getattr(self._trainer, "model", None)
        self._setup_router(args, self._model, kwargs.get("optimizer"), late=True)
        if self.router is not None:
            self.router.check_bound()
        self._resolve_config(args)
        if self.replan_every is None:
            self.replan_every = self.config.placement.replan_every
        if self._model is not None:
            # share the engine's collector when it has one; else attach (and later detach) our own
            self._collector = collector_of(self._model)
            if self._collector is None and self.config.collect_stats:
                self._collector = attach_collector(self._model, affinity=self.config.placement.use_affinity)
                self._owns_collector = True
        if self._model is not None and self._hook is None:
            self._hook = self._model.register_forward_hook(self._record_aux)
        self._snapshot_window()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._collector is not None:
            self._collector.step()

    def on_substep_end(self, args, state, control, **kwargs):
        if self._collector is not None:
            self._collector.step()  # a micro-batch boundary inside gradient accumulation

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.router is not None:
            self.router.after_step()  # DeepSeek-V3's bias update, once per optimizer step (collective)

    def on_step_end(self, args, state, control, **kwargs):
        rt = self.runtime()
        if self.replan_every and state.global_step % self.replan_every == 0:
            self._replan(rt, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or (self._collector is None and self.router is None):
            return
        figs = self.figures() if self._collector is not None else {}
        if self.router is not None:
            figs.update(self.router.log_figures(self.per_expert_max))
        logs.update(figs)
        # the Trainer appended a copy of ``logs`` to the history just before calling on_log
        hist = state.log_history
        if hist and hist[-1].get("step") == state.global_step and all(hist[-1].get(k) == v for k, v in logs.items()
                                                                      if k not in figs):
            hist[-1].update(figs)

    def on_save(self, args, state, control, model=None, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._save_full_experts(folder, state, model)
        if self._collector is None:
            return
        stats = _global_stats(self._collector, self.all_ranks)
        if state.is_world_process_zero:
            os.makedirs(folder, exist_ok=True)
            stats.save_json(os.path.join(folder, STATS_FILE))

    def _save_full_experts(self, folder: str, state, model) -> None:
        """With FSSDP the Trainer's weights file lacks the expert shards (they live in DeepSpeed's folder):
        gather full experts (a collective; on_save runs on every rank) and rewrite the Hugging Face weights."""
        rt = (runtime_of(model) if isinstance(model, torch.nn.Module) else None) or self.runtime()
        fssdp = getattr(rt, "fssdp", None)
        if fssdp is None:
            return
        full = rt.export_state_dict()
        if state.is_world_process_zero and hasattr(model, "save_pretrained"):
            model.save_pretrained(folder, state_dict=full)

    def on_train_end(self, args, state, control, **kwargs):
        if self._collector is not None:
            stats = _global_stats(self._collector, self.all_ranks)
            if state.is_world_process_zero and stats.layers:
                os.makedirs(args.output_dir, exist_ok=True)
                stats.save_json(os.path.join(args.output_dir, STATS_FILE))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._owns_collector:
            detach_collector(self._model, self._collector)
            self._owns_collector = False

    # -- pieces ---------------------------------------------------------------------------------------
    def _record_aux(self, module, args, output):
        aux = getattr(output, "aux_loss", None)
        if aux is None:
            aux = moe_aux_loss(module)
        if aux is None or not torch.is_tensor(aux):
            return
        aux = aux.detach().float().reshape(())
        self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux
        self._aux_n += 1

    def _snapshot_window(self) -> None:
        if self._collector is not None:
            self._window_start = self._collector.snapshot()

    def figures(self) -> dict[str, float]:
        """The MoE figures since the previous call (summed over ranks); resets the window."""
        out: dict[str, float] = {}
        now = self._collector.snapshot()
        window = stats_delta(now, self._window_start)
        self._window_start = now
        aux = torch.tensor([float(self._aux_sum) if self._aux_sum is not None else 0.0, float(self._aux_n)],
                           dtype=torch.float64)
        self._aux_sum, self._aux_n = None, 0
        if self.all_ranks and dist_on():
            window = reduce_stats(window) if window.layers else window
            aux = host_all_reduce(aux)
        routed = {l: window.counts[l] for l in window.layers if sum(window.counts[l]) > 0}
        b = balance(routed)
        for l, c in routed.items():
            total = sum(c)
            out[f"moe/balance/{l}"] = b["per_layer"][l]
            out[f"moe/load_max/{l}"] = max(c) / total
            out[f"moe/load_min/{l}"] = min(c) / total
            if len(c) <= self.per_expert_max:
                for e, v in enumerate(c):
                    out[f"moe/load/{l}/e{e}"] = v / total
        if routed:
            out["moe/balance"] = b["overall"]
            out["moe/tokens"] = float(max(window.tokens.values()))  # tokens entering the MoE layers
        aux = aux.cpu().tolist()
        if aux[1] > 0:
            out["moe/aux_loss"] = aux[0] / aux[1]
        rt = self.runtime()
        if rt is not None and callable(getattr(rt, "metrics", None)):
            m = rt.metrics()
            for key in ("comm_bytes", "dropped_tokens"):
                if isinstance(m.get(key), (int, float)):
                    out[f"moe/{key}"] = float(m[key])
        out["moe/replans"] = float(self.replans)
        return out

    def _replan(self, rt, step: int) -> None:
        stats = _global_stats(self._collector, self.all_ranks) if self._collector is not None else None
        hook = getattr(rt, "replan", None)
        if callable(hook):
            hook(stats)
        elif not self._warned_replan and self.on_replan is None:
            logger.warning("HexaMoECallback: placement.replan_every=%d but the runtime has no replan(); "
                           "routing statistics are still collected and saved", self.replan_every)
            self._warned_replan = True
        if self.on_replan is not None:
            self.on_replan(stats, step)
        self.replans += 1

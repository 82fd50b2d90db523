"""DeepSpeed hooks of FSSDP: the sharded optimizer driven by a DeepSpeed engine (ZeRO stage 1/2 for the dense
part).

``engine.step()`` at an accumulation boundary: DeepSpeed computes its dense gradient norm; our hook
adds the experts' squared norm (one all_reduce) so both sides clip with ONE global norm; DeepSpeed
steps the dense partition and its LR scheduler; then the shards step with the learning rate the dense
optimizer just used, their gradients unscaled by the same loss scale and clip factor.
"""
from __future__ import annotations

import functools

import torch

from ..config import ConfigError
from .checkpoint import wrap_checkpointing
from .optim import OptimizerSpec, ShardedOptimizer


def _spec(engine, optimizer_config) -> OptimizerSpec:
    if optimizer_config is not None:
        return OptimizerSpec.from_deepspeed(optimizer_config)
    name = engine.optimizer_name() if hasattr(engine, "optimizer_name") else None
    if name is not None:
        return OptimizerSpec.from_deepspeed({"type": name, "params": dict(engine.optimizer_params() or {})})
    basic = getattr(engine, "basic_optimizer", None)
    if isinstance(basic, torch.optim.Optimizer):
        return OptimizerSpec.from_torch(basic)
    raise ConfigError('optimizer: FSSDP needs the DeepSpeed "optimizer" section (or an AdamW/Adam/SGD client '
                      "optimizer) to build the expert shards' optimizer")


class EngineBinding:
    """The expert shards' optimizer and the DeepSpeed engine driving it (``attach``): the hooks on the engine's
    step, zero_grad, gradient norm, overflow check and checkpoints."""

    def __init__(self):
        self.optimizer: ShardedOptimizer | None = None
        self.engine = None
        self.scaled_norm: float | None = None  # set by the norm hook during engine.step

    def build_optimizer(self, shards: dict, grads: dict, spec: OptimizerSpec) -> ShardedOptimizer:
        self.optimizer = ShardedOptimizer.create(shards, grads, spec)
        return self.optimizer

    def shards_replaced(self) -> None:
        """Re-sharding made new shard parameters: the engine's name table (built once at initialize) learns
        them. DeepSpeed records a zero-element parameter (a rank left owning no expert of a layer) with the
        frozen ones by that table, so a checkpoint save would fail on a shard it does not know."""
        if self.engine is not None and hasattr(self.engine, "param_names"):
            self.engine.param_names = {p: n for n, p in self.engine.module.named_parameters()}

    def attach(self, mgr, engine, optimizer_config=None, lr_scheduler=None) -> None:
        """Drive ``mgr``'s shards from ``engine`` (see the module docstring); ``lr_scheduler``: where the learning
        rate comes from when the dense optimizer has no param groups."""
        if getattr(engine, "hexamoe_fssdp", None) is not None:
            raise RuntimeError("FSSDPManager.attach: this engine already has an FSSDP manager attached")
        stage = engine.zero_optimization_stage()
        if stage not in (1, 2):
            raise ConfigError(f"zero_optimization.stage: got {stage}; FSSDP shards the experts itself and keeps "
                              "dense parameters under ZeRO stage 1 or 2 (set 1 or 2)")
        if engine.module is not mgr.model and mgr.model not in list(engine.module.modules()):
            raise RuntimeError("FSSDPManager.attach: the engine wraps a different model than the one shard_model "
                               "sharded")
        leaked = [n for n, p in engine.module.named_parameters() if mgr.owns(p) and _in_optimizer(engine.optimizer, p)]
        if leaked:
            raise ConfigError(f"model_parameters: expert shard {leaked[0]!r} was given to DeepSpeed's optimizer; "
                              "pass only parameters for which manager.owns(p) is False")
        self._install_norm_hooks(mgr, engine.optimizer)
        mgr.build_optimizer(_spec(engine, optimizer_config))
        self.engine = engine
        engine.hexamoe_fssdp = mgr
        self._wrap_step(mgr, engine, lr_scheduler)
        inner_zero = engine.zero_grad

        @functools.wraps(inner_zero)
        def zero_grad(*args, **kwargs):
            mgr.synchronize()
            mgr.zero_grad()
            return inner_zero(*args, **kwargs)

        engine.zero_grad = zero_grad
        wrap_checkpointing(mgr, engine)

    def _wrap_step(self, mgr, engine, lr_scheduler) -> None:
        inner_step = engine.step

        @functools.wraps(inner_step)
        def step(*args, **kwargs):
            mgr.synchronize()
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                lr = _current_lr(engine, lr_scheduler, self.optimizer)
                loss_scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
                self.scaled_norm = None
            out = inner_step(*args, **kwargs)
            if boundary:
                if getattr(engine, "_step_applied", not getattr(engine.optimizer, "overflow", False)):
                    clip = 1.0
                    max_norm = engine.gradient_clipping()
                    if max_norm > 0:
                        if self.scaled_norm is None:
                            raise RuntimeError("FSSDP: DeepSpeed skipped its gradient norm; cannot clip the experts")
                        # DeepSpeed's formula (stage_1_and_2.unscale_and_clip_grads), on the same global norm
                        clip = max(((self.scaled_norm / loss_scale) + 1e-6) / max_norm, 1.0)
                    self.optimizer.step(lr, 1.0 / (loss_scale * clip))
                mgr.zero_grad()
                mgr.telemetry.end_step()
                every = mgr.cfg.fssdp.reshard_every
                if every and engine.global_steps % every == 0:  # load-aware re-ownership (docs/fssdp.md)
                    mgr.last_reown = mgr.reown()
            return out

        engine.step = step

    def _install_norm_hooks(self, mgr, opt) -> None:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(opt, DeepSpeedZeroOptimizer):
            raise ConfigError(
                f"zero_optimization: FSSDP needs DeepSpeed's ZeRO stage 1/2 optimizer for the dense part, got "
                f"{type(opt).__name__} (bf16 with ZeRO stage 1 and fp32 gradient accumulation selects "
                'BF16_Optimizer: use "zero_optimization": {"stage": 2} or "data_types": {"grad_accum_dtype": "bf16"})'
            )
        inner_norm = opt.scaled_global_norm

        @functools.wraps(inner_norm)
        def scaled_global_norm(*args, **kwargs):
            dense = inner_norm(*args, **kwargs)  # ||g_dense|| * loss_scale, or a negative sentinel when invalid
            experts = mgr.expert_grad_sq_norm()  # our buffers hold loss-scaled gradients too
            d = dense.double() if torch.is_tensor(dense) else torch.tensor(float(dense), dtype=torch.float64)
            if not torch.isfinite(d) or d < 0 or not torch.isfinite(experts):
                total = torch.tensor(-1.0)
            else:
                total = torch.sqrt(d * d + experts).float()
            if torch.is_tensor(dense):
                total = total.to(device=dense.device, dtype=dense.dtype)
            self.scaled_norm = float(total)
            return total

        opt.scaled_global_norm = scaled_global_norm
        inner_overflow = opt.has_overflow

        @functools.wraps(inner_overflow)
        def has_overflow(*args, **kwargs):
            dense = inner_overflow(*args, **kwargs)
            return mgr.expert_grads_overflow() or dense

        opt.has_overflow = has_overflow


def _in_optimizer(opt, p) -> bool:
    groups = getattr(opt, "bit16_groups", None)
    if groups is not None:
        return any(q is p for g in groups for q in g)
    return any(q is p for g in getattr(opt, "param_groups", []) for q in g["params"])


def _current_lr(engine, lr_scheduler, optimizer: ShardedOptimizer) -> float:
    groups = getattr(engine.optimizer, "param_groups", None)
    if groups:
        return float(groups[0]["lr"])
    if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
        return float(lr_scheduler.get_last_lr()[0])
    return float(optimizer.spec.lr)

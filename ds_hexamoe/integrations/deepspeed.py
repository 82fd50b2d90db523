"""``ds_hexamoe.initialize``: ``deepspeed.initialize`` with the ``"hexamoe"`` config section honoured.

Steps: parse and validate the section (before any work), switch the model's MoE experts to the
``"hexamoe"`` implementation, shard experts with FSSDP when asked (before DeepSpeed sees the
parameters, so ZeRO only ever holds dense ones), build expert/dense parameter groups, call DeepSpeed,
and attach :class:`~ds_hexamoe.runtime.HexaMoERuntime` as ``engine.hexamoe``. With ``"profile"``
"measure" or "declared", device profiles and the heterogeneity plan come first (before converting or
sharding: infeasible inputs fail before any work); FSSDP shards with the plan's weights unless
``shard_weights`` is set, and the runtime runs the plan with a controller, ``engine.hexamoe.hetero``
(``engine.hexamoe.plan`` reads the plan, ``engine.hexamoe.replan`` changes it; see :mod:`ds_hexamoe.hetero`).

After ``import ds_hexamoe``, a plain ``deepspeed.initialize`` whose config has a ``"hexamoe"`` section
is routed here too, so ``accelerate`` and the Hugging Face ``Trainer`` pick it up.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, HexaMoEConfig, hexamoe_section, load_ds_config
from ..distributed import dist_on
from ..ops.dispatch import set_backend
from ..runtime import HexaMoERuntime
from .ds_ops import check_build_locks
from .shm import release_shm_workspace
from ..experts import IMPLEMENTATION, attach_lora, experts_modules, state_of

_ORIGINAL_INITIALIZE = None


def _original_initialize():
    import deepspeed

    return _ORIGINAL_INITIALIZE or deepspeed.initialize


def _is_expert_param(name: str, module_names: set[str]) -> bool:
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return owner in module_names


def convert_model(model: nn.Module, config: HexaMoEConfig | None = None) -> list[str]:
    """Route every MoE experts module of ``model`` through the expert-specific operators.

    Hugging Face models built on ``@use_experts_implementation`` switch to ``"hexamoe"``; ds-hexamoe's
    own blocks already use it. Returns the qualified names of the experts modules (also stored on each
    module's :class:`~ds_hexamoe.experts.ExpertsState` for statistics). Raises when the model has no MoE experts at all.
    """
    if config is not None:
        set_backend(config.kernels)
    set_impl = getattr(model, "set_experts_implementation", None)
    if callable(set_impl) and getattr(getattr(model, "config", None), "_experts_implementation", None) != IMPLEMENTATION:
        set_impl(IMPLEMENTATION)
    found = experts_modules(model)
    if not found:
        raise ConfigError(
            f"hexamoe: model {type(model).__name__} has no MoE experts module (a transformers "
            "@use_experts_implementation class or ds_hexamoe.layers.HexaExperts); remove the \"hexamoe\" section "
            "or pass an MoE model"
        )
    for name, m in found:
        state_of(m).name = name
    attach_lora(model)  # PEFT LoRA on experts: the expert-specific path, not a materialized W + A B
    return [n for n, _ in found]


def build_param_groups(
    model: nn.Module, ds_config: dict | None = None, exclude=None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: dense and expert parameters, each with and without weight decay.

    Biases, norms and other 1-D parameters get no weight decay; expert groups are named so logs and
    DeepSpeed's optimizer state keep them apart. ``exclude(param) -> bool`` drops parameters that
    another optimizer owns (FSSDP shards).
    """
    params_cfg = ((ds_config or {}).get("optimizer") or {}).get("params") or {}
    decay = float(params_cfg.get("weight_decay", 0.0))
    expert_names = {n for n, _ in experts_modules(model)}
    buckets: dict[str, list[nn.Parameter]] = {"dense": [], "dense_no_decay": [], "experts": [], "experts_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad or (exclude is not None and exclude(p)):
            continue
        kind = "experts" if _is_expert_param(name, expert_names) else "dense"
        no_decay = p.dim() < 2 or name.endswith(".bias") or name.endswith("_bias")
        # router weights are [E, d] but behave like a classifier head: decaying them biases routing
        if "router" in name or name.endswith("gate.weight"):
            no_decay = True
        buckets[kind + ("_no_decay" if no_decay else "")].append(p)
    groups = []
    for key, ps in buckets.items():
        if ps:
            groups.append({"params": ps, "weight_decay": 0.0 if key.endswith("no_decay") else decay, "name": f"hexamoe_{key}"})
    return groups


def _resolve_config(args, config, config_params) -> tuple[dict, bool]:
    """The DeepSpeed config dict and whether it came from ``args.deepspeed_config``."""
    if config is not None or config_params is not None:
        return load_ds_config(config if config is not None else config_params), False
    path = getattr(args, "deepspeed_config", None) if args is not None else None
    if path is not None:
        return load_ds_config(path), True
    return {}, False


def _filter_optimizer(optimizer: torch.optim.Optimizer, keep: set[int]) -> None:
    """Drop parameters the model no longer holds (replaced by FSSDP shards) from a user optimizer."""
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def _init_distributed(port) -> None:
    import deepspeed

    if not dist_on():
        deepspeed.init_distributed(distributed_port=port)
    _release_once()


def _release_once() -> None:
    if dist_on() and not getattr(_release_once, "done", False):
        _release_once.done = True
        release_shm_workspace()


def initialize(
    args=None,
    model: nn.Module | None = None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    distributed_port: int = 29500,
    mpu=None,
    dist_init_required: bool | None = None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
):
    """Same signature and return value as ``deepspeed.initialize``; see the module docstring."""

    if model is None:
        raise ConfigError("ds_hexamoe.initialize: model is required")
    ds_config, from_args = _resolve_config(args, config, config_params)
    hcfg = hexamoe_section(ds_config) or HexaMoEConfig()
    check_build_locks()  # a dead op build's lock would make DeepSpeed wait forever, silently
    ds_kwargs = dict(
        args=args, training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
        mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, mesh_param=mesh_param,
    )
    if not from_args:
        ds_kwargs["config"] = ds_config
    if not hcfg.enabled:
        return _original_initialize()(model=model, optimizer=optimizer, model_parameters=model_parameters, **ds_kwargs)

    planning = None
    if hcfg.profile != "uniform" or hcfg.replans_fssdp:
        # profiles, the model shape and the first plan come first: bad device files and infeasible plans fail
        # before any work, and the shape is taken before FSSDP replaces the experts' full weights
        _init_distributed(distributed_port)
        from ..hetero import PlanState  # lazy, like every heavy import here: `import ds_hexamoe` stays light
        from ..placement.options import PlanOptions

        planning = PlanState.from_config(model, hcfg, ds_config, options=PlanOptions.from_config(hcfg))
    convert_model(model, hcfg)
    manager = _shard_experts(model, hcfg, planning, distributed_port) if hcfg.sharding == "fssdp" else None
    model_parameters = _dense_parameters(model, ds_config, optimizer, model_parameters, manager)
    engine, opt, loader, sched = _original_initialize()(
        model=model, optimizer=optimizer, model_parameters=model_parameters, **ds_kwargs
    )
    _release_once()
    if manager is not None:
        manager.attach(engine, optimizer_config=ds_config.get("optimizer"), lr_scheduler=sched)
    # with profiles: engine.hexamoe.hetero (batch shares, step hook, slowdown emulation) over the plan state
    engine.hexamoe = HexaMoERuntime(model, hcfg, fssdp=manager, planning=planning, engine=engine)
    return engine, opt, loader, sched


def _shard_experts(model: nn.Module, hcfg: HexaMoEConfig, planning, port):
    """FSSDP shards with the plan's weights (unless ``shard_weights`` is set) and declared slice speeds."""
    _init_distributed(port)
    from ..fssdp import FSSDPManager
    from ..hetero.resolve import declared_speeds

    shard_cfg = hcfg
    if planning is not None and planning.fssdp_weights() is not None:
        shard_cfg = dataclasses.replace(hcfg, shard_weights=planning.fssdp_weights())
    speeds = declared_speeds(hcfg, torch.distributed.get_world_size())
    return FSSDPManager.shard_model(model, shard_cfg, speeds=speeds)


def _dense_parameters(model: nn.Module, ds_config: dict, optimizer, model_parameters, manager):
    """What DeepSpeed optimizes: parameter groups built here, or the user's without FSSDP's shards."""
    owns = manager.owns if manager is not None else None
    if optimizer is None and model_parameters is None:
        return build_param_groups(model, ds_config, exclude=owns)
    if manager is not None:
        live = {id(p) for p in model.parameters() if not owns(p)}
        if isinstance(optimizer, torch.optim.Optimizer):
            _filter_optimizer(optimizer, live)
        if model_parameters is not None:
            return _filter_model_parameters(model_parameters, live)
    return model_parameters


def _filter_model_parameters(model_parameters, live: set[int]):
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        out = []
        for g in items:
            ps = [p for p in g["params"] if id(p) in live]
            if ps:
                out.append(dict(g, params=ps))
        return out
    return [p for p in items if id(p) in live]


# --- routing plain deepspeed.initialize through us -------------------------------------------------

def _wants_hexamoe(bound: inspect.BoundArguments) -> bool:
    a = bound.arguments
    try:
        cfg, _ = _resolve_config(a.get("args"), a.get("config"), a.get("config_params"))
    except ConfigError:
        return False  # let DeepSpeed report its own config errors
    return "hexamoe" in cfg


def patch_deepspeed(module) -> None:
    """Make ``deepspeed.initialize`` honour a ``"hexamoe"`` section (idempotent)."""
    global _ORIGINAL_INITIALIZE
    current = module.initialize
    if getattr(current, "_hexamoe_patched", False):
        return
    _ORIGINAL_INITIALIZE = current
    sig = inspect.signature(current)

    @functools.wraps(current)
    def patched(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        if _wants_hexamoe(bound):
            return initialize(**bound.arguments)
        return current(*args, **kwargs)

    patched._hexamoe_patched = True
    module.initialize = patched


def install_patch() -> None:
    from .._import_hooks import when_imported

    when_imported("deepspeed", patch_deepspeed)

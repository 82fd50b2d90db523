"""Sharding: full 3-D expert parameters replaced by this rank's whole-expert shards.

Shards are known by a registry (:func:`is_shard`, :func:`shard_range`), not by attributes stamped on
the parameters (docs/design.md, "FSSDP"). :class:`~.shard_store.ShardStore` keeps what this module makes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..config import ConfigError, HexaMoEConfig
from ..experts import IMPLEMENTATION, attach_lora, experts_modules, weight_names
from .execution import check_parallel_module
from .layer import ExpertLayer
from .lora import adapter_tensors, release_peft_factors
from .ownership import normalized_weights, split_experts

# shard parameter -> the global expert ids of its rows; weak, so a dropped model leaves nothing behind
_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def is_shard(p) -> bool:
    """True for a parameter that is an FSSDP expert shard."""
    return p in _SHARDS


def shard_experts(p) -> tuple[int, ...] | None:
    """The global expert ids of a shard's rows; None for any other tensor."""
    return _SHARDS.get(p)


def shard_range(p) -> tuple[int, int] | None:
    """``(lo, hi)`` when a shard holds the contiguous experts ``lo:hi``; None for any other tensor, or a shard
    whose experts are not contiguous (after load-aware re-ownership: see :func:`shard_experts`)."""
    ids = _SHARDS.get(p)
    if ids is None or (ids and list(ids) != list(range(ids[0], ids[0] + len(ids)))):
        return None
    return (ids[0], ids[0] + len(ids)) if ids else (0, 0)


def make_shard(data: torch.Tensor, requires_grad: bool, experts) -> nn.Parameter:
    """A shard parameter whose rows hold ``experts`` (global ids; ``data`` is taken as is)."""
    shard = nn.Parameter(data, requires_grad=requires_grad)
    shard.ds_optim_param = True  # unique per rank: DeepSpeed must not broadcast it from rank 0
    _SHARDS[shard] = tuple(experts)
    return shard


def _check_module(name: str, module: nn.Module) -> None:
    impl = getattr(getattr(module, "config", None), "_experts_implementation", IMPLEMENTATION)
    if impl != IMPLEMENTATION:
        raise ConfigError(f"hexamoe.sharding: experts module {name!r} runs the {impl!r} experts implementation; "
                          f'load the model with experts_implementation="{IMPLEMENTATION}" (or call '
                          f'model.set_experts_implementation("{IMPLEMENTATION}")) before FSSDP sharding')
    names = weight_names(module)
    full = {k: getattr(module, n, None) for k, n in names.items()}
    missing = [names[k] for k, p in full.items() if not isinstance(p, nn.Parameter)]
    if missing:
        raise ConfigError(f"hexamoe.sharding: experts module {name!r} has no parameter {missing[0]!r}")
    if any(is_shard(p) for p in full.values()):
        raise ConfigError(f"hexamoe.sharding: experts module {name!r} is already FSSDP-sharded")
    num_experts = full["w1"].size(0)
    if any(p.size(0) != num_experts for p in full.values()):
        raise ConfigError(f"hexamoe.sharding: experts module {name!r} has parameters with different expert counts")


def _shard_module(i: int, name: str, module: nn.Module, rank: int, weights: list[float]) -> ExpertLayer:
    names = weight_names(module)
    full = {k: getattr(module, n) for k, n in names.items()}
    full.update(adapter_tensors(name, module, names))  # LoRA factors live with their expert
    num_experts = full["w1"].size(0)
    own = split_experts(num_experts, weights, layer=i)
    layer = ExpertLayer(index=i, name=name, module=module, ownership=own, rank=rank, names=names,
                        expert_shapes={names[k]: tuple(p.shape[1:]) for k, p in full.items()})
    ids = torch.tensor(own.owned(rank), dtype=torch.long)
    for k, p in full.items():
        shard = make_shard(p.detach().index_select(0, ids.to(p.device)).clone(), p.requires_grad, own.owned(rank))
        if hasattr(module, names[k]):
            delattr(module, names[k])
        module.register_parameter(names[k], shard)
        layer.shards[names[k]] = shard
    release_peft_factors(module)
    if getattr(module, "num_experts", None) is None:
        module.num_experts = num_experts
    return layer


def shard_layers(model: nn.Module, cfg: HexaMoEConfig, group=None):
    """``(layers, group)``: every experts module of ``model`` sharded on this rank (all checked first)."""
    if not dist.is_initialized():
        raise RuntimeError("FSSDPManager.shard_model: torch.distributed is not initialized; call "
                           'deepspeed.init_distributed("gloo"|"nccl") first')
    if cfg.sharding != "fssdp":
        raise ConfigError(f'hexamoe.sharding: got {cfg.sharding!r}; set "fssdp" to shard experts with FSSDP')
    world = dist.get_world_size(group)
    weights = normalized_weights(cfg.shard_weights, world)
    found = experts_modules(model)
    if not found:
        raise ConfigError(f"hexamoe.sharding: model {type(model).__name__} has no MoE experts module to shard; "
                          'set "sharding": "none" or pass an MoE model')
    attach_lora(model)  # PEFT's LoRA on experts: its factors are sharded with the experts below
    for name, m in found:  # every module is checked before any is changed
        _check_module(name, m)
        adapter_tensors(name, m, dict(weight_names(m)))
        if cfg.mode in ("expert_parallel", "model_centric", "hecate"):
            check_parallel_module(name, m)
    # a dedicated group keeps FSSDP's (possibly asynchronous) collectives apart from DeepSpeed's
    group = group if group is not None else dist.new_group(list(range(world)))
    rank = dist.get_rank(group)
    return [_shard_module(i, name, m, rank, weights) for i, (name, m) in enumerate(found)], group

"""The shard store: this rank's expert shards of every FSSDP layer, their fp32 gradients and ownership.

It knows which parameters are shards (:meth:`ShardStore.owns`), keeps one fp32 gradient buffer per
shard, installs the state-dict hooks that keep shards out of a module's state dict while full (e.g.
Hugging Face) tensors still load into them, and rebuilds the shards on a new ownership (re-sharding).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from ..experts import state_of
from ..parallel.accounting import CommStats, blocked
from .layer import ExpertLayer
from .ownership import LayerOwnership
from .sharding import make_shard


class ShardStore:
    """The layers' shards on this rank of ``group``, the ``owns()`` registry and the fp32 gradient buffers."""

    def __init__(self, layers: list[ExpertLayer], group):
        self.layers, self.group = layers, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self._ids: set[int] = set()
        self._reindex()
        for layer in layers:
            _install_state_dict_hooks(layer)
            for n, p in layer.shards.items():
                self.grads[(layer.index, n)] = _grad_buffer(p)

    def owns(self, p: torch.Tensor) -> bool:
        """True for the expert shard parameters FSSDP steps itself (keep them out of DeepSpeed's optimizer)."""
        return id(p) in self._ids

    def shard_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.shards.values()]

    def shards_by_key(self) -> dict[tuple[int, str], nn.Parameter]:
        """``{(layer index, parameter name): shard}``, the keys of :attr:`grads`."""
        return {(layer.index, n): p for layer in self.layers for n, p in layer.shards.items()}

    def layer(self, which) -> ExpertLayer:
        """The layer ``which`` names: an :class:`ExpertLayer`, its index or its module name."""
        if isinstance(which, ExpertLayer):
            return which
        if isinstance(which, int) and not isinstance(which, bool):
            if 0 <= which < len(self.layers):
                return self.layers[which]
        elif isinstance(which, str):
            for layer in self.layers:
                if layer.name == which:
                    return layer
        names = [layer.name for layer in self.layers]
        raise KeyError(f"layer: got {which!r}; expected an index in [0, {len(self.layers)}) or one of {names}")

    def accumulate(self, layer: ExpertLayer, summed: dict[str, torch.Tensor] | None) -> None:
        """Add a reduce-scatter's summed gradients (``None``: this rank owns none of the layer) to the buffers."""
        if summed is None:
            return
        scale = 1.0 / self.world_size  # DeepSpeed averages dense gradients over data-parallel ranks
        for n, g in summed.items():
            self.grads[(layer.index, n)].add_(g, alpha=scale)

    def zero_grads(self) -> None:
        for g in self.grads.values():
            g.zero_()

    def grad_sq_norm(self, stats: CommStats) -> torch.Tensor:
        """Global squared norm of the expert gradients (disjoint shards: a sum over ranks); a collective."""
        local = torch.zeros((), dtype=torch.float64)
        for g in self.grads.values():
            if g.numel():
                local += g.double().pow(2).sum()
        with blocked(stats, "norm"):
            dist.all_reduce(local, group=self.group)
        stats.norm_bytes += 8 * (self.world_size - 1)
        return local

    def grads_overflow(self, stats: CommStats) -> bool:
        """Whether any rank's expert gradients hold an inf or NaN; a collective."""
        bad = torch.tensor([0], dtype=torch.uint8)
        for g in self.grads.values():
            if g.numel() and not torch.isfinite(g).all():
                bad.fill_(1)
        with blocked(stats, "norm"):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        stats.norm_bytes += self.world_size - 1
        return bool(bad.item())

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.shard_parameters())

    def grad_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grads.values())

    def rebuild(self, new_owns: list[LayerOwnership], new_rows: dict[tuple[int, str], torch.Tensor]) -> None:
        """Shards and gradient buffers on the ownership ``new_owns`` (one per layer), filled from ``new_rows``
        (``{(layer, name): [experts owned now, >= numel per expert]}``, rows in increasing expert id)."""
        for layer, new in zip(self.layers, new_owns):
            layer.ownership = new
            for n in layer.param_names:
                old_p = layer.shards[n]
                rows = new_rows[(layer.index, n)]
                k = layer.expert_numel(n)
                shape = (new.count(self.rank), *layer.expert_shapes[n])
                shard = make_shard(rows[:, :k].reshape(shape).to(old_p.dtype).clone(), old_p.requires_grad,
                                   new.owned(self.rank))
                delattr(layer.module, n)
                layer.module.register_parameter(n, shard)
                layer.shards[n] = shard
                self.grads[(layer.index, n)] = _grad_buffer(shard)
        self._reindex()

    def _reindex(self) -> None:
        self._ids = {id(p) for layer in self.layers for p in layer.shards.values()}


def _grad_buffer(p: nn.Parameter) -> torch.Tensor:
    """The fp32 gradient buffer of a shard; empty for a frozen one (LoRA's base experts get no gradient)."""
    return torch.zeros(p.shape if p.requires_grad else (0,), dtype=torch.float32, device=p.device)


def _install_state_dict_hooks(layer: ExpertLayer) -> None:
    module = layer.module
    module.register_state_dict_post_hook(functools.partial(_drop_shards, layer))
    module.register_load_state_dict_pre_hook(functools.partial(_load_full_into_shards, layer))
    module.register_load_state_dict_post_hook(functools.partial(_forgive_missing_shards, layer))


def _drop_shards(layer: ExpertLayer, module, state_dict, prefix, local_metadata) -> None:
    # a shard is meaningful only with its rank's expert range: checkpoints keep shards in FSSDP's own
    # files and full_state_dict() gives full experts; the module's state dict carries the dense part
    for n in layer.param_names:
        state_dict.pop(prefix + n, None)


def _load_full_into_shards(layer: ExpertLayer, module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                           errors) -> None:
    state_of(module).load_prefix = prefix
    for n in layer.param_names:
        t = state_dict.pop(prefix + n, None)
        if t is not None and t.dim() >= 1 and t.size(0) == layer.num_experts:  # a full (e.g. Hugging Face) tensor
            with torch.no_grad():
                layer.shards[n].copy_(t.index_select(0, torch.tensor(layer.owned, dtype=torch.long, device=t.device)))


def _forgive_missing_shards(layer: ExpertLayer, module, incompatible) -> None:
    prefix = state_of(module).load_prefix
    drop = {prefix + n for n in layer.param_names}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in drop]

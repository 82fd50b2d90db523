"""One FSSDP-managed experts module: its local shard parameters and the layout of its full layer.

The full layer (every expert, every weight of the module) is laid out as one flat buffer
``[sum_name E * numel_e(name)]`` so a single pipeline-shared cache slot serves any layer; each
weight is a ``[E, ...]`` region of it in the module's stored orientation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .ownership import LayerOwnership

# provider key -> attribute, in the order experts are packed for communication; the LoRA factors of an
# adapter on the experts (``A[E, in, r]``, ``B[E, r, out]``: ds_hexamoe.experts.lora) live with their expert
WEIGHT_KEYS = ("w1", "w2", "b1", "b2", "w1_lora_a", "w1_lora_b", "w2_lora_a", "w2_lora_b")


@dataclass
class ExpertLayer:
    """FSSDP state of one experts module (``index``: position among the model's MoE layers)."""

    index: int
    name: str
    module: nn.Module
    ownership: LayerOwnership
    rank: int
    names: dict[str, str]  # provider key -> parameter name
    expert_shapes: dict[str, tuple[int, ...]]  # parameter name -> per-expert shape
    shards: dict[str, nn.Parameter] = field(default_factory=dict)  # parameter name -> [E_local, ...]

    @property
    def num_experts(self) -> int:
        return self.ownership.num_experts

    @property
    def owned(self) -> tuple[int, ...]:
        """Global ids of this rank's experts, in shard row order."""
        return self.ownership.owned(self.rank)

    @property
    def local_count(self) -> int:
        return self.ownership.count(self.rank)

    def local_rows(self, experts) -> torch.Tensor:
        """Shard rows of owned ``experts`` (global ids)."""
        return torch.tensor([self.ownership.row(e) for e in experts], dtype=torch.long, device=self.device)

    @property
    def param_names(self) -> list[str]:
        return [self.names[k] for k in WEIGHT_KEYS if k in self.names]

    def expert_numel(self, name: str) -> int:
        n = 1
        for s in self.expert_shapes[name]:
            n *= s
        return n

    @property
    def numel_per_expert(self) -> int:
        return sum(self.expert_numel(n) for n in self.param_names)

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA factors among :attr:`param_names` (ds_hexamoe.fssdp.lora)."""
        return [self.names[k] for k in WEIGHT_KEYS[4:] if k in self.names]

    @property
    def grad_names(self) -> list[str]:
        """The trainable ones among :attr:`param_names`: frozen experts (LoRA's base) get no gradient to reduce."""
        return [n for n in self.param_names if self.shards[n].requires_grad]

    @property
    def grad_numel_per_expert(self) -> int:
        return sum(self.expert_numel(n) for n in self.grad_names)

    @property
    def full_numel(self) -> int:
        return self.num_experts * self.numel_per_expert

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.shards.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.shards.values())).device

    def full_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: [E, ...]}`` regions of a flat full-layer buffer, as tensors that alias it without
        view tracking (so reusing the buffer for the next layer never trips autograd's view checks)."""
        out, off = {}, 0
        storage, base = flat.untyped_storage(), flat.storage_offset()
        for name in self.param_names:
            shape = (self.num_experts, *self.expert_shapes[name])
            t = torch.empty(0, dtype=flat.dtype, device=flat.device)
            t.set_(storage, base + off, shape)
            out[name] = t
            off += self.num_experts * self.expert_numel(name)
        return out

    def pack_local(self, experts: list[int]) -> torch.Tensor:
        """Owned experts (global ids) flattened and packed ``[len(experts), numel_per_expert]``."""
        local = self.local_rows(experts)
        cols = [self.shards[n].detach().index_select(0, local).reshape(len(experts), -1) for n in self.param_names]
        return torch.cat(cols, dim=1)

    def unpack_into(self, full: dict[str, torch.Tensor], experts: list[int], rows: torch.Tensor) -> None:
        """Write packed ``rows[len(experts), numel_per_expert]`` into the full views at ``experts``."""
        ids = torch.tensor(experts, dtype=torch.long, device=rows.device)
        off = 0
        for n in self.param_names:
            k = self.expert_numel(n)
            dst = full[n].view(self.num_experts, k)
            dst.index_copy_(0, ids, rows[:, off:off + k].to(dst.dtype))
            off += k

    def pack_grads(self, grads: dict[str, torch.Tensor | None], experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Gradients of the trainable full-layer tensors (:attr:`grad_names`) at ``experts``, packed in rows."""
        ids = torch.tensor(experts, dtype=torch.long, device=self.device)
        cols = []
        for n in self.grad_names:
            g = grads.get(n)
            k = self.expert_numel(n)
            if g is None:
                cols.append(torch.zeros(len(experts), k, dtype=dtype, device=self.device))
            else:
                cols.append(g.reshape(self.num_experts, k).index_select(0, ids).to(dtype))
        return torch.cat(cols, dim=1)

    def split_grad_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed gradient rows ``[n, grad_numel_per_expert]`` split back into ``{name: [n, ...]}``."""
        out, off = {}, 0
        for n in self.grad_names:
            k = self.expert_numel(n)
            out[n] = rows[:, off:off + k].reshape(rows.size(0), *self.expert_shapes[n])
            off += k
        return out

"""The sharded optimizer of FSSDP: each rank steps only the experts it owns.

Gradients arrive (already summed over the ranks that used each expert and averaged like DeepSpeed's
dense gradients) in fp32 buffers; the step runs a torch optimizer over fp32 master copies (the shard
parameters themselves when the model is fp32) and writes the result back into the shard parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError

_IGNORED = {"torch_adam", "fp32_optimizer_states", "foreach", "adam_w_mode", "bias_correction", "fused"}
_KNOWN = {"lr", "betas", "eps", "weight_decay", "amsgrad", "momentum", "nesterov", "dampening"}


@dataclass(frozen=True)
class OptimizerSpec:
    """Which update rule the shards use; built from DeepSpeed's ``"optimizer"`` section."""

    kind: str  # "adamw" | "adam" | "sgd"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0

    @classmethod
    def from_deepspeed(cls, section: dict) -> OptimizerSpec:
        if not isinstance(section, dict) or "type" not in section:
            raise ConfigError(f"optimizer: got {section!r}; expected a DeepSpeed optimizer section "
                              '{"type": "AdamW" | "Adam" | "SGD", "params": {...}}')
        kind = str(section["type"]).lower()
        params = dict(section.get("params") or {})
        if kind == "adam":  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
            kind = "adamw" if params.get("adam_w_mode", True) else "adam"
        if kind not in ("adamw", "adam", "sgd"):
            raise ConfigError(f"optimizer.type: got {section['type']!r}; FSSDP expert shards support "
                              '"AdamW", "Adam" and "SGD" (choose one of them or disable hexamoe.sharding)')
        unknown = sorted(set(params) - _KNOWN - _IGNORED)
        if unknown:
            raise ConfigError(f"optimizer.params.{unknown[0]}: not supported for FSSDP expert shards; "
                              f"supported keys are {sorted(_KNOWN)}")
        kw = {k: params[k] for k in _KNOWN if k in params}
        if "betas" in kw:
            kw["betas"] = tuple(float(b) for b in kw["betas"])
        return cls(kind=kind, **kw)

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        d = optimizer.defaults
        kinds = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}
        kind = kinds.get(type(optimizer))
        if kind is None:
            raise ConfigError(f"optimizer: FSSDP cannot mirror client optimizer {type(optimizer).__name__}; pass an "
                              'AdamW/Adam/SGD optimizer or a DeepSpeed "optimizer" section')
        if kind == "adam" and d.get("decoupled_weight_decay", False):
            kind = "adamw"
        keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "momentum", "nesterov", "dampening")
        return cls(kind=kind, **{k: d[k] for k in keys if k in d and d[k] is not None})

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                                   weight_decay=self.weight_decay, nesterov=self.nesterov)
        cls = torch.optim.AdamW if self.kind == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                   amsgrad=self.amsgrad)


@dataclass(eq=False)
class ShardEntry:
    key: tuple[int, str]  # (layer index, parameter name)
    param: nn.Parameter  # the shard the model computes with
    master: torch.Tensor  # fp32; ``param`` itself when the model is fp32
    grad: torch.Tensor  # fp32 gradient accumulator, shaped like ``param``


class ShardedOptimizer:
    """Steps this rank's expert shards with ``spec``; ``step(lr, grad_scale)`` per accumulation boundary."""

    def __init__(self, entries: list[ShardEntry], spec: OptimizerSpec):
        self.entries, self.spec = entries, spec
        self.stepped = [e for e in entries if e.param.numel() > 0 and e.param.requires_grad]
        self.optimizer = spec.build([e.master for e in self.stepped]) if self.stepped else None

    @classmethod
    def create(cls, shards: dict[tuple[int, str], nn.Parameter], grads: dict[tuple[int, str], torch.Tensor],
               spec: OptimizerSpec) -> ShardedOptimizer:
        entries = []
        for key, p in shards.items():
            # a frozen shard (LoRA's base) is never stepped: no fp32 master either
            keep = p.dtype == torch.float32 or not p.requires_grad
            master = p if keep else nn.Parameter(p.detach().float().clone(), requires_grad=False)
            entries.append(ShardEntry(key=key, param=p, master=master, grad=grads[key]))
        return cls(entries, spec)

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float) -> None:
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for e in self.stepped:
            e.master.grad = e.grad.mul_(grad_scale)
        self.optimizer.step()
        for e in self.stepped:
            e.master.grad = None
            if e.master is not e.param:
                e.param.copy_(e.master)

    def zero_grad(self) -> None:
        for e in self.entries:
            e.grad.zero_()

    def state(self, entry: ShardEntry) -> dict:
        return {} if self.optimizer is None else self.optimizer.state.get(entry.master, {})

    def set_state(self, entry: ShardEntry, state: dict) -> None:
        if self.optimizer is not None and entry in self.stepped:
            self.optimizer.state[entry.master] = state

    def nbytes(self) -> dict[str, int]:
        def size(t):
            return t.numel() * t.element_size()

        master = sum(size(e.master) for e in self.entries if e.master is not e.param)
        grads = sum(size(e.grad) for e in self.entries)
        states = sum(size(v) for e in self.entries for v in self.state(e).values() if torch.is_tensor(v))
        return {"master_bytes": master, "grad_bytes": grads, "optimizer_state_bytes": states}

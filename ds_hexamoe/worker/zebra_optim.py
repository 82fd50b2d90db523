"""The optimizer of one zebra rank (docs/modes.md, "Zebra", training features): AdamW over what the rank owns,
fp32 master copies when the model trains in bf16 or fp16, dynamic loss scaling in fp16, clipping by the
global gradient norm over all ranks, the recipe's schedule, and its state for checkpoints.

There is no DeepSpeed engine on the zebra path, so this is the engine's optimizer side in small: the model's
tensors are in the training dtype; ``masters`` are fp32 (the model's own tensors in fp32); gradients are
copied to the masters, unscaled, checked for overflow on every rank, clipped, stepped, and the masters copied
back. A step with an inf/nan gradient anywhere is skipped on every rank and the scale halved (DeepSpeed's
rule without hysteresis); ``loss_scale_window`` clean steps double it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..recipes import lr_lambda


class LossScale:
    """DeepSpeed's dynamic fp16 loss scale (``fp16`` section: ``loss_scale`` 0 = dynamic,
    ``initial_scale_power``, ``loss_scale_window``, ``min_loss_scale``)."""

    def __init__(self, section: dict):
        static = float(section.get("loss_scale", 0) or 0)
        self.dynamic = static == 0
        self.value = static or 2.0 ** int(section.get("initial_scale_power", 16))
        self.window, self.floor = int(section.get("loss_scale_window", 1000)), float(section.get("min_loss_scale", 1))
        self.clean = 0

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.value, self.clean = max(self.floor, self.value / 2), 0
            return
        self.clean += 1
        if self.clean % self.window == 0:
            self.value *= 2

    def state_dict(self) -> dict:
        return {"value": self.value, "clean": self.clean}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.clean = float(state["value"]), int(state["clean"])


class ZebraOptimizer:
    """AdamW on ``named`` (``(name, parameter)`` this rank owns) with the recipe's settings; ``fp16``: the
    DeepSpeed config's ``fp16`` section (None: no loss scaling)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], training, fp16: dict | None = None):
        t = training
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # fp32 parameters are their own masters (nothing copied); low-precision ones get an fp32 copy
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                        for p in self.params]
        self.opt = torch.optim.AdamW(self.masters, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                     weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t))
        self.scale = LossScale(fp16) if fp16 is not None else None
        self.max_norm, self.skipped = t.max_grad_norm, 0

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.scale is None else self.scale.value

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def step(self, divide: float, counted: bool | list[bool]) -> float:
        """Masters' gradients = the model's / (``divide`` x loss scale); skip on overflow anywhere, else clip by
        the global norm (``counted``: this rank's tensors count in it, or per tensor) and step. Returns the norm (inf when
        skipped). Collective."""
        div = divide * self.loss_scale
        for p, m in zip(self.params, self.masters):
            g = torch.zeros_like(m) if p.grad is None else p.grad.float()
            m.grad = g.div_(div) if div != 1 else g
        norm = global_norm(self.masters, counted)
        # only a scaled loss skips a step (fp32 and bf16 step as DeepSpeed does; the loop stops on a nan loss)
        overflow = self.scale is not None and not torch.isfinite(torch.tensor(norm))
        if self.scale is not None:
            self.scale.update(overflow)
        if overflow:
            self.skipped += 1
        else:
            if self.max_norm > 0 and norm > self.max_norm:
                for m in self.masters:
                    m.grad.mul_(self.max_norm / (norm + 1e-6))
            self.opt.step()
            self.sched.step()  # a skipped step leaves the schedule where it was, as DeepSpeed does
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    if m is not p:
                        p.copy_(m)
        for p, m in zip(self.params, self.masters):
            if m is p:
                p.grad.zero_()
            else:
                p.grad = m.grad = None
        return norm

    def nbytes(self) -> dict:
        """Bytes this rank holds for the optimizer: Adam moments and fp32 masters (beside the parameters)."""
        moments = sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        masters = sum(m.numel() * m.element_size() for p, m in zip(self.params, self.masters) if m is not p)
        return {"optimizer_bytes": moments + masters, "master_bytes": masters}

    def state_dict(self) -> dict:
        return {"names": list(self.names), "masters": {n: m.detach() for n, m in zip(self.names, self.masters)},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "loss_scale": None if self.scale is None else self.scale.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"the checkpoint holds parameters {state['names'][:3]}... for this rank, this run owns "
                             f"{self.names[:3]}...; the zebra split differs")
        with torch.no_grad():
            for n, p, m in zip(self.names, self.params, self.masters):
                m.copy_(state["masters"][n])
                if m is not p:
                    p.copy_(m)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scale is not None and state["loss_scale"] is not None:
            self.scale.load_state_dict(state["loss_scale"])
        self.skipped = int(state["skipped"])


def global_norm(params: list[torch.Tensor], counted: bool | list[bool]) -> float:
    """The gradient norm over every rank's disjoint parameters (``counted``: this rank's copy is the one
    summed, for all or per tensor; a dense copy on a second attention rank is not). inf/nan when any
    gradient is."""
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)  # the backend's device
    flags = counted if isinstance(counted, list) else [counted] * len(params)
    for p, mine in zip(params, flags):
        if mine and p.grad is not None:
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq)
    return float(sq.sqrt())

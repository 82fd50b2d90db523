"""The router's auxiliary (load-balancing) loss on the zebra pipeline (docs/modes.md, "Zebra").

transformers' ``load_balancing_loss_func`` pools every MoE layer's router over the whole batch:
``aux = E * sum_e (counts_e / R) * (prob_sum_e / R)``, ``counts`` the top-k picks (no gradient), ``prob_sum``
the summed router probabilities, ``R`` the routed rows of all layers. On the pipeline each (layer,
micro-batch) segment is differentiated on its own, so no graph holds the whole sum. But the gradient of
``aux`` with respect to one segment's ``prob_sum`` is ``E * counts / R**2``, known once every segment of the
step has run forward: the pipeline runs all attention segments before the first head (GPipe order), where
:meth:`ZebraBalance.settle` sums ``counts`` and ``R`` over the attention ranks (one all-reduce). Each
segment's residual output carries an identity whose backward hands that gradient to its ``prob_sum``, so the
router weights receive exactly one process's gradient, whatever the split.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..layers.balance import pooled_router_sums

_UNBOUND = object()


class ZebraBalance:
    """One step's router statistics on an attention rank; :meth:`bind` the attention ranks' group first."""

    def __init__(self, coef: float, experts: int, top_k: int):
        self.coef, self.experts, self.top_k = coef, experts, top_k
        self.scale = 1.0  # the loss scale (fp16): the injected gradient is the scaled loss's
        self.group = _UNBOUND
        self._sums = torch.zeros(2 * experts + 1, dtype=torch.float64)  # counts, prob sums, rows
        self._total: torch.Tensor | None = None  # the sums over all attention ranks, once settled

    @classmethod
    def of(cls, model, c) -> "ZebraBalance | None":
        """The balance of ``model``'s config (None when ``output_router_logits`` is off)."""
        cfg = model.config
        if not getattr(cfg, "output_router_logits", False):
            return None
        coef = getattr(cfg, "router_aux_loss_coef", None)
        if coef is None:
            raise ValueError(f"zebra: {type(model).__name__} has output_router_logits but no router_aux_loss_coef; "
                             "set config.output_router_logits = false")
        return cls(float(coef), c.experts, c.top_k)

    def bind(self, group) -> None:
        """The process group of the attention ranks (None: one attention rank)."""
        self.group = group

    def record(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``h`` unchanged, carrying the gradient of the aux loss for this segment's router ``logits``."""
        if self._total is not None:  # the first segment of a new step
            self._sums.zero_()
            self._total = None
        counts, probs, rows = pooled_router_sums((logits,), self.top_k)
        if self._sums.device != counts.device:  # the pipeline's device (cuda:LOCAL_RANK under NCCL)
            self._sums = self._sums.to(counts.device)
        e = self.experts
        self._sums[:e] += counts.double()
        self._sums[e:2 * e] += probs.detach().double()
        self._sums[2 * e] += float(rows)
        return _Inject.apply(h, probs, self)

    def settle(self) -> None:
        """Sum the step's statistics over the attention ranks (once per step, before the first backward)."""
        if self._total is not None:
            return
        if self.group is _UNBOUND:
            raise RuntimeError("ZebraBalance.bind(group) was not called: the attention ranks' group is needed")
        total = self._sums.clone()
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        self._total = total

    def value(self) -> float:
        """The step's auxiliary loss (before ``coef``), as transformers computes it on the whole batch."""
        e, t = self.experts, self._total
        return float(e * (t[:e] / t[2 * e] * t[e:2 * e] / t[2 * e]).sum())

    def grad(self) -> torch.Tensor:
        """d(coef * aux * scale) / d(prob_sum) of any segment."""
        e, t = self.experts, self._total
        return self.coef * self.scale * e * t[:e] / t[2 * e] ** 2


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, probs, balance):
        ctx.balance = balance
        ctx.meta = (probs.dtype, probs.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, gh):
        dtype, device = ctx.meta
        return gh, ctx.balance.grad().to(dtype=dtype, device=device), None

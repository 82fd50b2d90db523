"""The non-disaggregated baseline for the zebra stack: every rank runs attention on its batch share
and hosts some experts, reached through :class:`~.expert_parallel.ExpertParallelMoE` at every layer.

Uneven ``shares`` and ``expert_owner`` make it the heterogeneous expert-parallel plan; even ones the
uniform plan. Dense gradients are summed over all ranks; each expert's gradient lives on its owner only.
``expert_owner=None`` is the data-centric plan instead: every rank computes every expert for its own
tokens and expert gradients are summed over ranks too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .expert_parallel import ExpertParallelMoE
from .zebra_model import ZebraModel


class ColocatedStep:
    """Forward + backward of one global batch, expert parallel without disaggregation."""

    def __init__(self, model: ZebraModel, shares: list[int], expert_owner: list[int] | None):
        self.model, self.rank, world = model, dist.get_rank(), dist.get_world_size()
        if len(shares) != world or any(not isinstance(s, int) or s < 1 for s in shares):
            raise ValueError(f"colocated.shares: got {shares}; expected one integer >= 1 per rank ({world})")
        bad_owner = expert_owner is not None and (
            len(expert_owner) != model.c.experts or any(not 0 <= r < world for r in expert_owner))
        if bad_owner:
            raise ValueError(f"colocated.expert_owner: got {expert_owner}; expected a rank in [0, {world}) per expert")
        self.shares, self.global_batch = shares, sum(shares)
        self.placement = None if expert_owner is None else {e: [r] for e, r in enumerate(expert_owner)}
        self.moe = ExpertParallelMoE(model.spec)

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        m, c = self.model, self.model.c
        denom = torch.tensor([m.loss_count(target)], dtype=torch.int64)
        dist.all_reduce(denom)  # the loss is a mean over the global batch
        z = m.embed(inputs)
        for layer in range(c.layers):
            h, x, idx, w = m.attention_segment(layer, z)
            if self.placement is None:
                y = m.expert_segment(layer, list(range(c.experts)), x, idx, w)
            else:
                y = self.moe(x, idx, w, self.placement, lambda hosted, _r, l=layer: m.experts_of(l, list(hosted)), layer)
            z = h + y.view_as(h)
        loss = m.head_loss(z, target, int(denom))
        loss.backward()
        params = m.dense_parameters() + (m.expert_parameters() if self.placement is None else [])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat, grads)
        return float(loss.detach())

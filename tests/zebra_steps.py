"""The training loop the zebra exactness tests share: optimizer steps of a pipeline on this rank's rows."""
from __future__ import annotations

import torch


def run_steps(rank: int, model, pipe, layout, opt, batches) -> dict:
    """One step per ``(inputs, targets)`` of ``batches`` (global micro-batches); the first step's gradients,
    every step's loss part, the parameters after the last step, and what this rank holds (experts: ``hosted``, or per layer ``hosted_by_layer``)."""
    rows, attending = layout.rows(rank), rank in layout.attention_ranks
    losses, grads = [], None
    for s, (x, t) in enumerate(batches):
        opt.zero_grad(set_to_none=False)
        losses.append(pipe.step(x[rows], t[rows]) if attending else pipe.step())
        if s == 0:
            grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
    return {"losses": losses, "grads": grads, "params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "hosted": None if layout.per_layer else layout.hosted(rank),
            "hosted_by_layer": [layout.hosted(rank, l) for l in range(len(layout.expert_owner))] if layout.per_layer else None,
            "attention": attending}


def reference_steps(model, opt, loss_of, batches) -> tuple[list[float], dict, dict]:
    """The single-process reference: ``loss_of(model, inputs, targets)`` over the same global micro-batches;
    every step's loss, the first step's gradients and the parameters after the last step."""
    losses, grads = [], None
    for s, (x, t) in enumerate(batches):
        opt.zero_grad()
        loss = loss_of(model, x, t)
        loss.backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(float(loss.detach()))
        opt.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}

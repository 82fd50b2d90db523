"""The training loop the zebra exactness tests share: optimizer steps of a pipeline on this rank's rows, the
single-process reference, and the comparison of every rank's part with it."""
from __future__ import annotations

import pytest
import torch


def run_steps(rank: int, model, pipe, layout, opt, batches, extra=None) -> dict:
    """One step per ``(inputs, targets)`` of ``batches`` (global micro-batches); the first step's gradients,
    every step's loss part (plus ``extra()``, a part computed beside the pipeline), the parameters after the
    last step, and what this rank holds (experts: ``hosted``, or per layer ``hosted_by_layer``)."""
    rows, attending = layout.rows(rank), rank in layout.attention_ranks
    losses, grads = [], None
    for s, (x, t) in enumerate(batches):
        opt.zero_grad(set_to_none=False)
        losses.append((pipe.step(x[rows], t[rows]) if attending else pipe.step()) + (extra() if extra else 0.0))
        if s == 0:
            grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
    stack = pipe.model
    layer_of = ({n: l for l in range(stack.c.layers) for n, p in model.named_parameters()
                 if any(p is q for q in stack.layer_expert_parameters(l))}
                if hasattr(stack, "layer_expert_parameters") else {})
    return {"losses": losses, "grads": grads, "params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "layer_of": layer_of,
            "hosted": None if layout.per_layer else layout.hosted(rank),
            "hosted_by_layer": [layout.hosted(rank, l) for l in range(len(layout.expert_owner))] if layout.per_layer else None,
            "attention": attending, "compact": getattr(pipe.model, "rows", None) is not None}


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


def check_against(ranks_out: list, ref: tuple, i: int, what: str = "") -> None:
    """Run ``i`` of every rank equals the reference: summed losses, and each parameter's gradient and value on
    the rank that holds it (routed experts: the hosted rows); every parameter is compared somewhere."""
    ref_losses, ref_grads, ref_params = ref
    total, checked = [0.0] * len(ref_losses), set()
    for per_rank in ranks_out:
        r = per_rank[i]
        total = [a + b for a, b in zip(total, r["losses"])]
        for name, want in ref_grads.items():
            got_g, got_p, want_p = r["grads"][name], r["params"][name], ref_params[name]
            if ".experts." in name:
                hosted = r["hosted"] if r["hosted_by_layer"] is None else r["hosted_by_layer"][r["layer_of"][name]]
                if not hosted:
                    continue
                want, want_p = want[hosted], want_p[hosted]
                if not r.get("compact"):  # the full tensor: its hosted rows (compact: only those are held)
                    got_g, got_p = got_g[hosted], got_p[hosted]
            elif not r["attention"]:
                continue
            torch.testing.assert_close(got_g, want, rtol=1e-5, atol=1e-6, msg=f"{what} grad {name}")
            torch.testing.assert_close(got_p, want_p, rtol=1e-4, atol=1e-5, msg=f"{what} param {name}")
            checked.add(name)
    assert checked == set(ref_grads), f"{what}: never compared: {sorted(set(ref_grads) - checked)}"
    assert total == pytest.approx(ref_losses, rel=1e-5), what

"""Disaggregated zebra training equals one process: losses, gradients and parameters after several
SGD-momentum steps, on 2 and 3 gloo ranks in fp32, against a plain PyTorch reference (per-expert loops)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_hexamoe.parallel.zebra import ZebraLayout
from ds_hexamoe.testing.zebra import ZebraModel, ZebraModelConfig, make_batch
from ds_hexamoe.testing import run_distributed
from zebra_steps import reference_steps, run_steps

CFG = ZebraModelConfig(layers=2, d=16, heads=2, seq=8, experts=4, ffn=24, top_k=2)
BATCH, STEPS = 6, 3
# world -> layouts run one after the other on the same ranks
LAYOUTS = {
    2: [ZebraLayout((0,), (6,), (1, 1, 1, 1), micro_batches=3)],
    3: [ZebraLayout((0, 1), (4, 2), (2, 2, 2, 2), micro_batches=2),
        ZebraLayout((0,), (6,), (1, 2, 2, 1), micro_batches=2)],
}


def _optimizer(model):
    # SGD with momentum, not Adam: the key bias has an exactly-zero true gradient (softmax ignores it), and
    # Adam would blow its rounding noise up to full steps that differ between any two summation orders
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _plain_loss(model: ZebraModel, inputs, target):
    """The stack with the experts written out as loops over experts: no package operator involved."""
    z = inputs
    for l in range(CFG.layers):
        h, x, idx, w = model.attention_segment(l, z)
        y = torch.zeros_like(x)
        for e in range(CFG.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            g, u = (x[rows] @ model.w1[l, e]).chunk(2, dim=-1)
            y = y.index_add(0, rows, w[rows, slot].unsqueeze(1) * ((F.silu(g) * u) @ model.w2[l, e]))
        z = h + y.view_as(h)
    return (model.dense["head"](z) - target).pow(2).sum() / target.numel()


def _reference():
    model = ZebraModel(CFG)
    return reference_steps(model, _optimizer(model), _plain_loss, [make_batch(CFG, BATCH, seed=s) for s in range(STEPS)])


# the non-disaggregated baselines of the benchmark, on 2 ranks: (shares, expert owners; None: data-centric)
COLOCATED = [((4, 2), (0, 1, 1, 0)), ((5, 1), None)]


def _train(rank, world, layouts, colocated=()):
    from ds_hexamoe.parallel.zebra import ZebraPipeline
    from ds_hexamoe.testing.zebra import ColocatedStep

    out = []
    for layout in list(layouts) + list(colocated):
        model = ZebraModel(CFG)
        if not isinstance(layout, ZebraLayout):  # a colocated plan, seen as every rank attending
            shares, owner = layout
            pipe = ColocatedStep(model, list(shares), None if owner is None else list(owner))
            layout = ZebraLayout(tuple(range(world)), shares, owner or (0,) * CFG.experts)
            if owner is None:
                layout = ZebraLayout(layout.attention_ranks, shares, (rank,) * CFG.experts)  # every expert's grad is here
        else:
            pipe = ZebraPipeline(model, layout, BATCH)
        batches = [make_batch(CFG, BATCH, seed=s) for s in range(STEPS)]
        out.append(run_steps(rank, model, pipe, layout, _optimizer(model), batches))
    return out


def _check(ranks_out, ref, layout_i):
    ref_losses, ref_grads, ref_params = ref
    total = [0.0] * STEPS
    for per_rank in ranks_out:
        r = per_rank[layout_i]
        total = [a + b for a, b in zip(total, r["losses"])]
        for name, want in list(ref_grads.items()):
            got_g, got_p, want_p = r["grads"][name], r["params"][name], ref_params[name]
            if name in ("w1", "w2"):
                if not r["hosted"]:
                    continue
                got_g, want, got_p, want_p = (t[:, r["hosted"]] for t in (got_g, want, got_p, want_p))
            elif not r["attention"]:
                continue
            torch.testing.assert_close(got_g, want, rtol=1e-5, atol=1e-6, msg=f"grad {name}")
            torch.testing.assert_close(got_p, want_p, rtol=1e-4, atol=1e-5, msg=f"param {name} after {STEPS} steps")
    assert total == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_zebra_training_equals_one_process(world):
    ref = _reference()
    colocated = COLOCATED if world == 2 else ()
    out = run_distributed(_train, world, LAYOUTS[world], colocated, timeout=240)
    for i in range(len(LAYOUTS[world]) + len(colocated)):
        _check(out, ref, i)


def test_layout_errors_name_the_field():
    with pytest.raises(ValueError, match=r"zebra\.expert_owner"):
        ZebraLayout((0,), (4,), (0, 1, 1, 1)).check(2, 4)  # an attention rank may not host experts
    with pytest.raises(ValueError, match=r"zebra\.shares"):
        ZebraLayout((0,), (1,), (1, 1, 1, 1), micro_batches=2).check(2, 4)
    with pytest.raises(ValueError, match=r"zebra\.attention_ranks"):
        ZebraLayout((2,), (4,), (1, 1, 1, 1)).check(2, 4)
    with pytest.raises(ValueError, match=r"zebra\.model\.heads"):
        ZebraModelConfig(d=10, heads=3)

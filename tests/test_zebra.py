"""Disaggregated zebra training equals one process: losses, gradients and parameters after several
SGD-momentum steps, on 2 and 3 gloo ranks in fp32, against a plain PyTorch reference (per-expert loops);
with experts on expert ranks only, and with Asym-EA placements (attention ranks hosting whole experts,
per layer). Messages are matched by order only (tag 0, NCCL's rule), so an ordering slip fails here."""
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
    2: [ZebraLayout((0,), (6,), (1, 1, 1, 1), micro_batches=3),
        # Asym-EA: the attention rank hosts expert 0 in layer 0, experts 1 and 3 in layer 1
        ZebraLayout((0,), (6,), ((0, 1, 1, 1), (1, 0, 1, 0)), micro_batches=3)],
    3: [ZebraLayout((0, 1), (4, 2), (2, 2, 2, 2), micro_batches=2),
        ZebraLayout((0,), (6,), (1, 2, 2, 1), micro_batches=2),
        # Asym-EA with two attention ranks serving each other's tokens, per layer, and one flat
        ZebraLayout((0, 1), (4, 2), ((0, 2, 1, 2), (2, 1, 0, 0)), micro_batches=2),
        ZebraLayout((0, 1), (3, 3), (1, 2, 0, 2), micro_batches=3)],
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
    seen = {n: [[] for _ in range(CFG.layers)] for n in ("w1", "w2")}
    for per_rank in ranks_out:
        r = per_rank[layout_i]
        total = [a + b for a, b in zip(total, r["losses"])]
        for name, want in list(ref_grads.items()):
            got_g, got_p, want_p = r["grads"][name], r["params"][name], ref_params[name]
            if name in ("w1", "w2"):
                for l, hosted in enumerate(r["hosted_by_layer"] or [r["hosted"]] * CFG.layers):
                    for got, exp, what in ((got_g[l, hosted], want[l, hosted], "grad"),
                                           (got_p[l, hosted], want_p[l, hosted], f"param after {STEPS} steps")):
                        torch.testing.assert_close(got, exp, rtol=1e-5 if what == "grad" else 1e-4,
                                                   atol=1e-6 if what == "grad" else 1e-5, msg=f"{what} {name}[{l}]")
                    seen[name][l] += hosted
                continue
            elif not r["attention"]:
                continue
            torch.testing.assert_close(got_g, want, rtol=1e-5, atol=1e-6, msg=f"grad {name}")
            torch.testing.assert_close(got_p, want_p, rtol=1e-4, atol=1e-5, msg=f"param {name} after {STEPS} steps")
    assert all(set(s) == set(range(CFG.experts)) for v in seen.values() for s in v), seen  # every expert compared
    assert total == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_zebra_training_equals_one_process(world):
    ref = _reference()
    colocated = COLOCATED if world == 2 else ()
    out = run_distributed(_train, world, LAYOUTS[world], colocated, timeout=240)
    for i in range(len(LAYOUTS[world]) + len(colocated)):
        _check(out, ref, i)


def test_layout_errors_name_the_field():
    ZebraLayout((0,), (4,), (0, 1, 1, 1)).check(2, 4)  # an attention rank may host experts (Asym-EA)
    with pytest.raises(ValueError, match=r"zebra\.expert_owner: ranks \[1\] neither attend"):
        ZebraLayout((0,), (4,), (0, 0, 0, 0)).check(2, 4)
    with pytest.raises(ValueError, match=r"zebra\.expert_owner: got 1 per-layer rows; expected one per layer \(2\)"):
        ZebraLayout((0,), (4,), ((0, 1, 1, 1),)).check(2, 4, layers=2)
    with pytest.raises(ValueError, match=r"zebra\.shares"):
        ZebraLayout((0,), (1,), (1, 1, 1, 1), micro_batches=2).check(2, 4)
    with pytest.raises(ValueError, match=r"zebra\.attention_ranks"):
        ZebraLayout((2,), (4,), (1, 1, 1, 1)).check(2, 4)
    with pytest.raises(ValueError, match=r"zebra\.model\.heads"):
        ZebraModelConfig(d=10, heads=3)

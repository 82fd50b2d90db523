"""Each zebra rank holds only its part (``parallel/zebra_parts.py``): an attention rank no routed expert, an
expert rank only its hosted experts' rows and no dense tensor; training on the parts still equals one process
(losses, gradients, parameters; fp32, 2 and 3 ranks), the gathered state dict is the reference model's, and
evaluation's gathered copy computes the trained reference's loss, and the parameter bytes per rank are what
each part weighs, against the colocated replicated run's full model. With Asym-EA's per-layer owners the
attention rank also holds, in one layer only, the rows of the expert it hosts there."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.parallel.zebra import ZebraLayout
from ds_hexamoe.testing import run_distributed
from test_zebra_families import BATCH, STEPS, _optimizer, _reference, batch, load, save_family
from zebra_steps import check_against, run_steps

LAYOUT = {"flat": ZebraLayout((0,), (4,), (1, 2, 2, 1), micro_batches=2),
          # Asym-EA: the attention rank hosts expert 0 in layer 0 only; expert 3 moves between the expert ranks
          "asym": ZebraLayout((0,), (4,), ((0, 2, 2, 1), (1, 2, 1, 2)), micro_batches=2)}


def _train_parts(rank, world, path, which):
    from ds_hexamoe.parallel.zebra import ZebraPipeline
    from ds_hexamoe.parallel.zebra_hf import HFZebraStack
    from ds_hexamoe.parallel.zebra_parts import full_copy, gather_state, keep_part, owned_bytes, param_bytes

    layout = LAYOUT[which]
    model = load(path)
    full = param_bytes(model)
    stack = HFZebraStack(model)
    dense = sum(p.numel() * p.element_size() for p in stack.dense_parameters())
    pipe = ZebraPipeline(stack, layout, BATCH)
    stack.balance.bind(pipe.dense_group)
    owned = owned_bytes(stack, layout, rank)
    keep_part(stack, layout, rank)
    assert param_bytes(model) == owned  # what the benchmark reports is what the rank holds
    held = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    first = rank == layout.attention_ranks[0]
    extra = (lambda: stack.balance.coef * stack.balance.value()) if first else None
    out = run_steps(rank, model, pipe, layout, _optimizer(model), [batch(s) for s in range(STEPS)], extra)
    ids, labels = batch(STEPS)
    with torch.no_grad():  # evaluation's copy: the whole trained model on every rank, transformers' forward
        val = float(full_copy(stack, layout, rank)(input_ids=ids, labels=labels).loss)
    return out, {"full": full, "dense": dense, "bytes": param_bytes(model), "held": held, "val": val,
                 "state": gather_state(stack, layout, rank)}


@pytest.mark.parametrize("which", ["flat", "asym"])  # 3 ranks: the experts split over two hosts (2 ranks: test_zebra_train's CLI run)
def test_each_rank_holds_its_part_and_trains_exactly(which, tmp_path):
    path, world = save_family(tmp_path, "mixtral"), 3
    ref = _reference(path)
    results = run_distributed(_train_parts, world, path, which, timeout=300)
    check_against([[o] for o, _ in results], ref, 0, f"{which} parts on {world} ranks")
    layout, experts, layers = LAYOUT[which], 4, 2
    trained = load(path, "eager")
    trained.load_state_dict(ref[2])
    ids, labels = batch(STEPS)
    with torch.no_grad():
        val = float(trained(input_ids=ids, labels=labels).loss)
    for rank, (_, mem) in enumerate(results):
        routed = mem["full"] - mem["dense"]
        hosted = [layout.hosted(rank, layer) for layer in range(layers)]
        held_experts = {n for n in mem["held"] if ".experts." in n}
        # each layer's experts weights are held where the rank hosts an expert of that layer, and only there
        assert held_experts == {n for n in mem["state"] if ".experts." in n and hosted[int(n.split(".")[2])]}
        share = routed * sum(map(len, hosted)) // (experts * layers)  # its hosted rows, per layer
        if rank in layout.attention_ranks:
            assert mem["bytes"] == mem["dense"] + share and mem["held"] - held_experts
        else:  # an expert rank holds no attention weight
            assert mem["held"] and mem["held"] == held_experts and mem["bytes"] == share
        assert mem["val"] == pytest.approx(val, rel=1e-5)
        assert mem["bytes"] < mem["full"]  # the colocated replicated run holds the full model on every rank
        for name, want in ref[2].items():
            torch.testing.assert_close(mem["state"][name], want, rtol=1e-4, atol=1e-5, msg=f"gathered {name}")
    if which == "asym":  # the attention rank does hold an expert, in layer 0 only
        assert {n.split(".")[2] for n in results[0][1]["held"] if ".experts." in n} == {"0"}

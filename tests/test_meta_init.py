"""A fresh model initialized from the meta device (:mod:`ds_hexamoe.models.meta_init`), for every family zebra
cuts: the whole model has ``from_config``'s shapes, dtypes, norms and buffers (rotary frequencies, router biases)
and its initializer's spread; a part (some expert rows, the dense part, nothing) equals those tensors of the
whole model, ties stay tied, the global random state is untouched; and a zebra rank allocates only what it
keeps (an expert rank no dense tensor, an attention rank hosting no expert no experts tensor)."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.models import meta_init
from ds_hexamoe.models.meta_init import materialize
from test_zebra_families import FAMILIES, SMALL


def _meta(family: str, tie: bool = False):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg_cls, _, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **kw, "tie_word_embeddings": tie}, initializer_range=0.05)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), cfg


def _experts(name: str, p) -> bool:
    return ".experts." in name and p.dim() == 3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parts_equal_the_whole_model(family):
    from transformers import AutoModelForCausalLM

    whole, cfg = _meta(family, tie=True)
    state = torch.get_rng_state()
    materialize(whole, 11)
    assert torch.equal(state, torch.get_rng_state())  # the caller's stream is not consumed
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    got, want = whole.state_dict(), ref.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    for name, value in dict(ref.named_buffers()).items():
        assert torch.equal(dict(whole.named_buffers())[name], value), name
    for name, p in whole.named_parameters():
        if "norm" in name:
            assert torch.equal(p, want[name]), name
        elif p.numel() >= 1000:  # drawn: the initializer's spread (not from_config's draws)
            assert float(p.detach().float().std()) == pytest.approx(0.05, rel=0.1), name
    assert not torch.equal(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])  # other draws
    rows = [3, 1]
    part, _ = _meta(family, tie=True)
    materialize(part, 11, lambda n, p: (p.shape, rows) if _experts(n, p) else None)
    dense, _ = _meta(family, tie=True)
    materialize(dense, 11, lambda n, p: None if _experts(n, p) else (p.shape, None))
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    n_experts = 0
    for (name, p), (_, d) in zip(part.named_parameters(), dense.named_parameters()):
        if _experts(name, p):
            n_experts += 1
            assert torch.equal(p, got[name][rows]) and d.device.type == "meta", name
        else:
            assert p.device.type == "meta" and torch.equal(d, got[name]), name
    assert n_experts >= 2
    for name, value in dict(ref.named_buffers()).items():  # buffers are built on every rank
        assert torch.equal(dict(part.named_buffers())[name], value), name


def test_a_different_seed_gives_different_weights():
    a, _ = _meta("mixtral")
    b, _ = _meta("mixtral")
    materialize(a, 1)
    materialize(b, 2)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_zebra_rank_allocates_only_what_it_keeps(rank, monkeypatch):
    from ds_hexamoe.parallel.zebra import ZebraLayout
    from ds_hexamoe.parallel.zebra_hf import HFZebraStack
    from ds_hexamoe.parallel.zebra_parts import init_part, keep_part

    whole, _ = _meta("mixtral")
    materialize(whole, 5)
    want = dict(whole.named_parameters())
    allocated = []
    real = meta_init._alloc
    monkeypatch.setattr(meta_init, "_alloc", lambda shape: allocated.append(tuple(shape)) or real(shape))
    model, cfg = _meta("mixtral")
    stack = HFZebraStack(model)
    layout = ZebraLayout((0,), (4,), ((0, 1, 1, 1), (1, 1, 1, 1)), micro_batches=2)  # rank 0 hosts in layer 0
    keep_part(stack, layout, rank)
    init_part(stack, layout, rank, seed=5)
    experts = [(n, p) for n, p in model.named_parameters() if _experts(n, p)]
    expert_shapes = {tuple(want[n].shape) for n, _ in experts}
    if rank == 0:  # the dense part, and layer 0's experts tensors (whole, then cut to expert 0)
        assert sum(s in expert_shapes for s in allocated) == 2
        assert (cfg.vocab_size, cfg.hidden_size) in allocated
    else:  # the experts of both layers, nothing dense
        assert set(allocated) == expert_shapes and len(allocated) == 4
    for name, p in model.named_parameters():
        layer = int(name.split(".")[2]) if _experts(name, p) else None
        hosted = [] if layer is None else layout.hosted(rank, layer)
        if layer is None:
            assert (p.device.type != "meta") == (rank == 0), name
            if rank == 0:
                assert torch.equal(p, want[name]), name
        elif hosted:
            assert torch.equal(p, want[name][hosted]), name
        else:
            assert p.device.type == "meta", name

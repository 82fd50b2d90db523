"""Each zebra rank reads only its tensors from a saved checkpoint (``parallel/zebra_load.py``): for every family
zebra cuts, a model built on the meta device and cut to one rank's part, filled by ``read_part``, equals that
part of ``from_pretrained``'s model (every kept tensor and buffer), an expert rank reads no dense entry and only
its own experts' entries (and small saved buffers), an attention rank no expert entry, and nothing is left on the meta device that the
rank keeps."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.parallel.zebra import ZebraLayout
from test_zebra_families import FAMILIES, load, save_family

LAYOUT = ZebraLayout((0,), (4,), (1, 2, 2, 1), micro_batches=2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_rank_reads_only_its_part(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_hexamoe.parallel.zebra_hf import HFZebraStack
    from ds_hexamoe.parallel.zebra_load import read_part
    from ds_hexamoe.parallel.zebra_parts import keep_part

    path = save_family(tmp_path, family)
    whole = load(path)
    want = dict(whole.named_parameters())
    for rank in range(3):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), experts_implementation="hexamoe",
                                                     dtype=torch.float32)
        stack = HFZebraStack(model)
        keep_part(stack, LAYOUT, rank)
        read = read_part(stack, LAYOUT, rank, path)
        hosted = LAYOUT.hosted(rank)
        kept = {n: p for n, p in model.named_parameters() if p.device.type != "meta"}
        assert kept and read
        for name, p in kept.items():
            w = want[name][hosted] if ".experts." in name else want[name]
            assert torch.equal(p, w), (family, rank, name)
        if hosted:  # an expert rank: no attention weight, its own experts' entries only (small buffers aside)
            dense = ("self_attn", "embed_tokens", "lm_head", "layernorm", "shared_expert", "gate.weight", "mlp.down")
            assert not [k for k in read if any(s in k for s in dense)], (family, read)
            assert all(".experts." in n for n in kept)
            others = [e for e in range(4) if e not in hosted]
            assert not [k for k in read if any(f".experts.{e}." in k for e in others)], (family, read)
        else:
            assert not any(".experts." in n and "shared" not in n for n in kept)
            assert not any(".experts." in k and "shared" not in k for k in read)
            for name, b in model.named_buffers():
                assert torch.equal(b, dict(whole.named_buffers())[name]), (family, name)


def test_per_layer_owners_read_each_layers_hosted_rows(tmp_path):
    # Asym-EA: the attention rank hosts expert 0 in layer 0 only; the expert ranks swap expert 3 between layers
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_hexamoe.parallel.zebra_hf import HFZebraStack
    from ds_hexamoe.parallel.zebra_load import read_part
    from ds_hexamoe.parallel.zebra_parts import keep_part

    layout = ZebraLayout((0,), (4,), ((0, 2, 2, 1), (1, 2, 1, 2)), micro_batches=2)
    path = save_family(tmp_path, "mixtral")
    want = dict(load(path).named_parameters())
    for rank in range(3):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        stack = HFZebraStack(model)
        keep_part(stack, layout, rank)
        read = read_part(stack, layout, rank, path)
        kept = {n: p for n, p in model.named_parameters() if p.device.type != "meta"}
        for name, p in kept.items():
            hosted = layout.hosted(rank, int(name.split(".")[2])) if ".experts." in name else None
            assert torch.equal(p, want[name] if hosted is None else want[name][hosted]), (rank, name)
        experts_read = {(int(k.split(".")[2]), int(k.split(".")[5])) for k in read if ".experts." in k}
        assert experts_read == {(layer, e) for layer in range(2) for e in layout.hosted(rank, layer)}, (rank, read)
        assert (rank == 0) == any("self_attn" in k for k in read)
        assert {n.split(".")[2] for n in kept if ".experts." in n} == {str(l) for l in range(2) if layout.hosted(rank, l)}

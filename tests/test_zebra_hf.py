"""Zebra on a Hugging Face Mixtral checkpoint (saved and loaded from disk) equals one process running
transformers' own forward and loss (``experts_implementation="eager"``): losses, gradients and parameters
after several SGD-momentum steps, on 2 and 3 gloo ranks in fp32, with labels that ignore some tokens so the
ranks' shares carry different loss counts. The colocated baselines run the same model on 2 ranks."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.parallel.zebra import ZebraLayout
from ds_hexamoe.testing import run_distributed
from zebra_steps import check_against, reference_steps, run_steps

BATCH, SEQ, VOCAB, EXPERTS, STEPS = 4, 8, 64, 4, 3
LAYOUTS = {
    2: [ZebraLayout((0,), (4,), (1, 1, 1, 1), micro_batches=2)],
    3: [ZebraLayout((0, 1), (3, 1), (2, 2, 2, 2), micro_batches=1),
        ZebraLayout((0,), (4,), (1, 2, 2, 1), micro_batches=2)],
}
COLOCATED = [((3, 1), (0, 1, 1, 0)), ((2, 2), None)]  # (shares, expert owners; None: data-centric)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                        num_experts_per_tok=2, max_position_embeddings=64, router_jitter_noise=0.0,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("zebra_hf") / "mixtral"
    MixtralForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _load(path, impl):
    from transformers import AutoModelForCausalLM

    import ds_hexamoe  # noqa: F401  (registers "hexamoe")

    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl, dtype=torch.float32)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # shares differ in how many tokens carry a loss
    labels[3, 2] = -100
    return ids, labels


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _reference(path):
    model = _load(path, "eager")
    return reference_steps(model, _optimizer(model), lambda m, ids, labels: m(input_ids=ids, labels=labels).loss,
                           [_batch(s) for s in range(STEPS)])


def _train(rank, world, path, layouts, colocated=()):
    from ds_hexamoe.parallel.zebra import ZebraPipeline
    from ds_hexamoe.testing.zebra import ColocatedStep
    from ds_hexamoe.parallel.zebra_hf import HFZebraStack

    out = []
    for layout in list(layouts) + list(colocated):
        model = _load(path, "hexamoe")
        stack = HFZebraStack(model)
        if isinstance(layout, ZebraLayout):
            pipe = ZebraPipeline(stack, layout, BATCH)
        else:
            shares, owner = layout
            pipe = ColocatedStep(stack, list(shares), None if owner is None else list(owner))
            layout = ZebraLayout(tuple(range(world)), shares, owner or (rank,) * EXPERTS)
        out.append(run_steps(rank, model, pipe, layout, _optimizer(model), [_batch(s) for s in range(STEPS)]))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_zebra_on_hf_mixtral_equals_one_process(world, checkpoint):
    ref = _reference(checkpoint)
    colocated = COLOCATED if world == 2 else ()
    out = run_distributed(_train, world, checkpoint, LAYOUTS[world], colocated, timeout=300)
    for i in range(len(LAYOUTS[world]) + len(colocated)):
        check_against(out, ref, i)


def test_unsupported_models_are_named(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from ds_hexamoe.parallel.zebra_hf import HFZebraStack

    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="no MoE decoder layer"):  # every layer dense: nothing to disaggregate
        HFZebraStack(Qwen2MoeForCausalLM(Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16, mlp_only_layers=[0],
                                                        shared_expert_intermediate_size=16, **small)))
    odd = MixtralForCausalLM(MixtralConfig(num_local_experts=4, intermediate_size=16, **small))
    odd.model.layers[0].mlp.add_module("norm", torch.nn.LayerNorm(32))  # an MoE block of another shape
    with pytest.raises(ValueError, match=r"decoder layer 0: its mlp .*'norm'"):
        HFZebraStack(odd)
    with pytest.raises(ValueError, match="router_jitter_noise"):
        HFZebraStack(MixtralForCausalLM(MixtralConfig(num_local_experts=4, intermediate_size=16,
                                                      router_jitter_noise=0.1, **small)))

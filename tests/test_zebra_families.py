"""Zebra on every family it cuts (Mixtral, Qwen2-MoE with its gated shared expert and a dense first layer,
Qwen3-MoE with a dense last layer, OLMoE, DeepSeek-V3 with shared experts, grouped routing and a dense first
layer), each a tiny config saved with ``save_pretrained`` and loaded from disk: losses, gradients and
parameters after several SGD-momentum steps on 2 and 3 gloo ranks equal one process running transformers'
own forward and loss (``experts_implementation="eager"``), fp32. Mixtral, Qwen2-MoE and OLMoE train with the
router's auxiliary loss on (``output_router_logits``), which the pipeline computes over the global batch."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.parallel.zebra import ZebraLayout
from ds_hexamoe.testing import run_distributed
from test_zebra_hf import BATCH, EXPERTS, STEPS, VOCAB, _load, _optimizer, _reference  # the Mixtral tests' shapes
from test_zebra_hf import _batch as batch
from zebra_steps import check_against, run_steps

SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_hidden_layers=2, num_local_experts=EXPERTS, num_experts_per_tok=2, intermediate_size=48,
                     router_jitter_noise=0.0, output_router_logits=True, router_aux_loss_coef=0.1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=3, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=24,
                       intermediate_size=40, shared_expert_intermediate_size=16, mlp_only_layers=[0],
                       output_router_logits=True, router_aux_loss_coef=0.1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=3, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=24,
                       intermediate_size=40, mlp_only_layers=[2], norm_topk_prob=True, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_hidden_layers=2, num_experts=EXPERTS, num_experts_per_tok=2, intermediate_size=24,
                   output_router_logits=True, router_aux_loss_coef=0.1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, n_routed_experts=EXPERTS, num_key_value_heads=4, num_experts_per_tok=2, n_group=2,
                         topk_group=1, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=24,
                         intermediate_size=40, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=1.5)),
}
LAYOUTS = {
    2: [ZebraLayout((0,), (4,), (1, 1, 1, 1), micro_batches=2)],
    3: [ZebraLayout((0, 1), (3, 1), (2, 2, 2, 2), micro_batches=1),
        ZebraLayout((0,), (4,), (1, 2, 2, 1), micro_batches=2)],
}


def save_family(root, family: str) -> str:
    """A tiny ``family`` model under ``root``, saved with ``save_pretrained``; returns its folder."""
    import transformers

    cfg_cls, model_cls, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **kw})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # routers start at zero in some families: random ones route unevenly
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.size(0) == EXPERTS:
                p.normal_(0, 0.5)
    path = f"{root}/{family}"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zebra_families")
    return {f: save_family(root, f) for f in FAMILIES}


def load(path, impl="hexamoe"):
    return _load(path, impl)



def _train(rank, world, paths):
    from ds_hexamoe.parallel.zebra import ZebraPipeline
    from ds_hexamoe.parallel.zebra_hf import HFZebraStack

    out = {}
    for family, path in paths.items():
        out[family] = []
        for layout in LAYOUTS[world]:
            model = load(path)
            stack = HFZebraStack(model)
            pipe = ZebraPipeline(stack, layout, BATCH)
            bal = stack.balance
            if bal is not None:
                bal.bind(pipe.dense_group)
            first = rank == layout.attention_ranks[0]  # the aux loss is global: one rank reports it
            extra = (lambda: bal.coef * bal.value()) if bal is not None and first else None
            out[family].append(run_steps(rank, model, pipe, layout, _optimizer(model), [batch(s) for s in range(STEPS)],
                                         extra))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_family_equals_one_process(world, checkpoints):
    out = run_distributed(_train, world, checkpoints, timeout=600)
    for family, path in checkpoints.items():
        ref = _reference(path)
        for i in range(len(LAYOUTS[world])):
            check_against([r[family] for r in out], ref, i, f"{family} on {world} ranks, layout {i}")


def test_aux_loss_is_on_where_asked(checkpoints):
    from ds_hexamoe.parallel.zebra_hf import HFZebraStack

    on = {f for f, p in checkpoints.items() if HFZebraStack(load(p)).balance is not None}
    assert on == {"mixtral", "qwen2_moe", "olmoe"}


def test_supported_models_lists_the_checked_families():
    import os

    import transformers

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "supported_models.md")).read()
    zebra = doc[doc.index("## Zebra"):]
    for family, (_, model_cls, _) in FAMILIES.items():
        assert f"| {family} | {model_cls} |" in zebra, family
        assert hasattr(transformers, model_cls)

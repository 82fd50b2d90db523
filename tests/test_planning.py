"""The one planning entry: FSSDP's re-plan (``"mode": "auto"``, no device profiles) and the heterogeneous
controller's re-plan infer the same sequence length, global micro-batch and model shape from the same
routing statistics, whatever the rank count and gradient accumulation."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.experts import RoutingStats
from ds_hexamoe.hetero.planning import infer_seq_len, shape_for_stats
from ds_hexamoe.placement.shapes import ModelShape
from ds_hexamoe.testing import run_distributed

VOCAB, SEQ, MICRO, GAS, STEPS = 64, 12, 2, 2, 2
DEVICES = [{"name": "cpu-a", "tflops": 1.0, "memory_gb": 8, "bandwidth_gbps": 10},
           {"name": "cpu-b", "tflops": 1.0, "memory_gb": 8, "bandwidth_gbps": 10}]


def _stats(tokens_per_forward: int, forwards: int) -> RoutingStats:
    t = tokens_per_forward * forwards
    return RoutingStats(["l0"], {"l0": [t, t]}, {"l0": t}, {"l0": 2}, {}, forwards)


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 3), (4, 1)])
def test_seq_len_from_tokens_per_forward(world, micro):
    """Each forward is one rank's micro-batch: tokens / forwards = micro * seq, whatever the world size."""
    stats = _stats(micro * 37, forwards=world * 5)
    assert infer_seq_len(stats, micro * world, world) == 37
    shape = ModelShape(hidden=8, expert_ffn=16, num_experts=2, top_k=2, num_moe_layers=1, seq_len=128)
    assert shape_for_stats(shape, stats, micro * world, world).seq_len == 37
    assert shape_for_stats(shape, None, micro * world, world) is shape
    assert infer_seq_len(_stats(0, 0), micro * world, world) is None


def _model():
    import ds_hexamoe  # noqa: F401  (registers the "hexamoe" experts implementation)
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="hexamoe").float()


def _replan_worker(rank, world, hexamoe):
    import deepspeed

    import ds_hexamoe
    from ds_hexamoe.experts import reduce_stats

    deepspeed.init_distributed("gloo")
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
              "hexamoe": {"kernels": "torch", "sharding": "fssdp", **hexamoe}}
    engine, *_ = ds_hexamoe.initialize(model=_model(), config=config)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS * GAS):
        x = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    rt = engine.hexamoe
    stats = reduce_stats(rt.stats.snapshot())
    plan = rt.replan(stats)
    shape = rt.hetero.shape if rt.hetero is not None else None
    return {"seq_len": plan.seq_len, "global_batch": plan.global_batch, "forwards": stats.forwards,
            "shape_seq": None if shape is None else shape.seq_len}


@pytest.mark.slow
def test_fssdp_and_hetero_replans_agree_on_the_shape():
    """2 ranks, micro-batch 2, 2 accumulation steps, sequences of 12: both re-plan routes plan for 12 tokens
    per sample and 4 samples per micro-step (FSSDP's used to divide by world x accumulation as well)."""
    auto = run_distributed(_replan_worker, 2, {"mode": "auto", "devices": DEVICES}, init_process_group=False,
                           timeout=300)
    hetero = run_distributed(_replan_worker, 2, {"profile": "declared", "devices": DEVICES},
                             init_process_group=False, timeout=300)
    for res in auto + hetero:
        assert res["forwards"] == 2 * STEPS * GAS
        assert (res["seq_len"], res["global_batch"]) == (SEQ, MICRO * 2)
    assert all(res["shape_seq"] == SEQ for res in hetero)

"""ds_hexamoe.initialize / patched deepspeed.initialize: 2 gloo ranks equal one process on the union of batches."""
from __future__ import annotations

import copy

import pytest
import torch

from ds_hexamoe.config import ConfigError
from ds_hexamoe.testing import run_distributed

VOCAB, SEQ, MICRO, STEPS = 64, 12, 2, 3


def _tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    return MixtralForCausalLM(cfg).float()


def _batches(world: int):
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (STEPS, world, MICRO, SEQ), generator=g)


def _ds_config(stage: int, hexamoe: dict | None = None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if hexamoe is not None:
        cfg["hexamoe"] = hexamoe
    return cfg


def _train_rank(rank, world, stage, use_patch, state):
    import deepspeed

    import ds_hexamoe

    from ds_hexamoe.integrations.shm import shm_workspace_names

    deepspeed.init_distributed("gloo")
    # DeepSpeed's CPU all-reduce workspace: one /dev/shm file per rank, which it never unlinks
    shm_before = len(shm_workspace_names())
    model = _tiny_mixtral()
    model.load_state_dict(state)
    cfg = _ds_config(stage, {"kernels": "torch"})
    init = deepspeed.initialize if use_patch else ds_hexamoe.initialize
    engine, *_ = init(model=model, config=cfg)
    shm_after = len(shm_workspace_names())
    assert engine.module.config._experts_implementation == "hexamoe"
    assert hasattr(engine, "hexamoe")
    losses = []
    for step_batches in _batches(world):
        ids = step_batches[rank]
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    metrics = engine.hexamoe.metrics()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {"params": params, "losses": losses, "metrics": metrics, "shm": (shm_before, shm_after)}


def _reference(state, world):
    from ds_hexamoe.integrations.deepspeed import build_param_groups

    model = _tiny_mixtral()
    model.load_state_dict(state)
    model.set_experts_implementation("eager")
    cfg = _ds_config(2)
    opt = torch.optim.AdamW(build_param_groups(model, cfg), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for step_batches in _batches(world):
        opt.zero_grad()
        # DeepSpeed averages each rank's mean-loss gradient: the same as the mean of per-rank losses
        loss = sum(model(input_ids=b, labels=b).loss for b in step_batches) / world
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage,use_patch", [(2, False), (1, True)])
def test_two_ranks_match_single_process(stage, use_patch):
    state = copy.deepcopy(_tiny_mixtral().state_dict())
    results = run_distributed(_train_rank, 2, stage, use_patch, state, init_process_group=False, timeout=240)
    ref = _reference(state, 2)
    # Adam turns fp32 rounding in near-zero gradients into differences of ~1e-5 (in fp64 the paths agree
    # to 1e-12); a wrong gradient moves parameters by ~lr = 1e-2, so 2e-4 still separates right from wrong.
    moved = max((ref[n] - state[n]).abs().max().item() for n in ref)
    assert moved > 2e-2
    for r in results:
        # initialize released the leaked workspace names (the mappings DeepSpeed uses stay)
        assert r["shm"][1] == 0, r["shm"]
        assert r["metrics"]["dropped_tokens"] == 0 and r["metrics"]["balance"] >= 1.0
        for name, p in ref.items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-3, atol=2e-4, msg=f"{name} differs after {STEPS} steps")


def test_param_groups_split_experts_and_decay():
    from ds_hexamoe.integrations.deepspeed import build_param_groups, convert_model

    model = _tiny_mixtral()
    names = convert_model(model)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    groups = {g["name"]: g for g in build_param_groups(model, _ds_config(2))}
    n_expert = sum(p.numel() for g in ("hexamoe_experts", "hexamoe_experts_no_decay") if g in groups for p in groups[g]["params"])
    assert n_expert == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert groups["hexamoe_dense"]["weight_decay"] == 0.1
    assert groups["hexamoe_dense_no_decay"]["weight_decay"] == 0.0
    routers = [p for p in groups["hexamoe_dense_no_decay"]["params"] if p.dim() == 2]
    assert len(routers) == 2  # router weights are never decayed
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_bad_sections_fail_before_work():
    import ds_hexamoe

    model = _tiny_mixtral()
    with pytest.raises(ConfigError, match=r"hexamoe\.shardng: unknown key \(did you mean 'sharding'\?\)"):
        ds_hexamoe.initialize(model=model, config=_ds_config(2, {"shardng": "fssdp"}))
    with pytest.raises(ConfigError, match=r"hexamoe\.kernels: got 'cuda'; allowed values are \['auto', 'torch', 'triton'\]"):
        ds_hexamoe.initialize(model=model, config=_ds_config(2, {"kernels": "cuda"}))
    with pytest.raises(ConfigError, match="does not exist"):
        ds_hexamoe.initialize(model=model, config="/nonexistent/ds_config.json")
    dense = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="has no MoE experts module"):
        ds_hexamoe.initialize(model=dense, config=_ds_config(2, {}))
    # nothing was converted by the failed calls
    assert model.config._experts_implementation != "hexamoe"

"""FSSDP equivalence on real gloo ranks under DeepSpeed ZeRO: N ranks with sharded experts, sparse
collectives and the sharded optimizer must end with the same parameters as one plain PyTorch process
training on the union of their batches (same losses, learning rates, global gradient norms).

The module also holds the harness the checkpoint tests reuse (tiny Mixtral, data, reference).
"""
from __future__ import annotations

import os

import pytest
import torch

from ds_hexamoe.testing import run_distributed

VOCAB, SEQ = 64, 8


def make_model(num_experts: int = 8, top_k: int = 2, seed: int = 0, impl: str = "hexamoe"):
    import ds_hexamoe  # noqa: F401  (registers the "hexamoe" experts implementation)
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).float()
    return model


PHASE = {"step": 0}  # the optimizer step being run (train_steps / reference set it): "switch" rules read it


def set_routing(model, rules: dict[int, tuple]):
    """Custom routing for tests: ``{layer: ("hot", e)}`` sends every token to expert ``e`` (both choices);
    ``{layer: ("avoid", e)}`` re-routes choices of ``e`` to ``e+1``; ``{layer: ("switch", e, f, k)}`` is
    ``("hot", e)`` before optimizer step ``k`` and ``("hot", f)`` from it on (an abrupt routing change).
    Router weights still get gradients."""
    handles = []
    for i, (kind, e, *rest) in rules.items():
        router = model.model.layers[i].mlp.gate

        def hook(mod, args, out, kind=kind, e=e, rest=tuple(rest)):
            logits, scores, index = out
            if kind == "switch":
                kind, e = "hot", (e if PHASE["step"] < rest[1] else rest[0])
            index = torch.full_like(index, e) if kind == "hot" else torch.where(index == e, (e + 1) % mod.num_experts, index)
            return logits, scores, index

        handles.append(router.register_forward_hook(hook))
    return handles


def batch(step: int, micro: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def ds_config(case: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": case["micro"],
        "gradient_accumulation_steps": case["gas"],
        "optimizer": {"type": "AdamW", "params": {"lr": case["lr"], "betas": [0.9, 0.99], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": case["lr"] / 4, "warmup_max_lr": case["lr"],
                                                     "warmup_num_steps": 3, "warmup_type": "linear"}},
        "gradient_clipping": case["clip"],
        "zero_optimization": {"stage": case.get("stage", 2)},
        "steps_per_print": 10_000,
    }
    return cfg


def hexamoe_cfg(case: dict):
    from ds_hexamoe.config import HexaMoEConfig

    fssdp = {"schedule": case.get("schedule", "hecate"), "history": case.get("history", 5), "budget": case.get("budget"),
             "reshard_every": case.get("reshard_every", 100), "fanout": case.get("fanout", "auto")}
    return HexaMoEConfig.from_dict({"sharding": "fssdp", "shard_weights": case.get("shard_weights"),
                                    "mode": case.get("mode", "data_centric"),
                                    "rematerialize": case.get("remat", True), "prefetch": case.get("prefetch", True),
                                    "fssdp": fssdp})


def build_engine(case: dict, seed: int = 0):
    """The lead's three steps: shard_model, deepspeed.initialize on dense params, attach."""
    import deepspeed

    from ds_hexamoe.fssdp import FSSDPManager

    model = make_model(case["experts"], case["top_k"], seed=seed)
    set_routing(model, case.get("routing", {}))
    manager = FSSDPManager.shard_model(model, hexamoe_cfg(case))
    dense = [p for p in model.parameters() if p.requires_grad and not manager.owns(p)]
    ds = ds_config(case)
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=dense, config=ds)
    manager.attach(engine, optimizer_config=ds["optimizer"], lr_scheduler=sched)
    return engine, manager


def train_steps(engine, manager, case: dict, rank: int, world: int, steps: range, *, out: dict | None = None,
                before_step=None, after_step=None) -> dict:
    """Run optimizer steps ``steps``; each rank reads its rows of the global batch of every micro-step.

    ``before_step(s, out)`` / ``after_step(s, out)`` run around each optimizer step (placement changes,
    extra records)."""
    rows = case["global_rows"] // world
    out = out if out is not None else {"loss": [], "lr": [], "norm": [], "comm": []}
    for s in steps:
        PHASE["step"] = s
        if before_step is not None:
            before_step(s, out)
        out["lr"].append(engine.get_lr()[0])
        losses = []
        for m in range(case["gas"]):
            x = batch(s, m, case["global_rows"])[rank * rows:(rank + 1) * rows]
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        # the global batch loss: mean over ranks and micro-steps (equal token counts everywhere)
        t = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        torch.distributed.all_reduce(t)
        out["loss"].append(float(t) / world)
        out["norm"].append(float(engine.get_global_grad_norm()))
        out["comm"].append(manager.last_step_comm_stats())
        if after_step is not None:
            after_step(s, out)
    return out


def reference(case: dict, steps: int, model=None) -> dict:
    """Plain single-process PyTorch on the union of every rank's batches (same loss averaging as DeepSpeed);
    ``model``: one to train instead of the case's (a PEFT model: only its trainable parameters step)."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    if model is None:
        model = make_model(case["experts"], case["top_k"], impl=case.get("ref_impl", "eager"))
        set_routing(model, case.get("routing", {}))
    params = [q for q in model.parameters() if q.requires_grad]
    p = ds_config(case)["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                            weight_decay=p["weight_decay"])
    sched = WarmupLR(opt, warmup_min_lr=case["lr"] / 4, warmup_max_lr=case["lr"], warmup_num_steps=3, warmup_type="linear")
    world, gas = case["world"], case["gas"]
    rows = case["global_rows"] // world
    out = {"loss": [], "lr": [], "norm": [], "states": []}
    for s in range(steps):
        PHASE["step"] = s
        out["lr"].append(opt.param_groups[0]["lr"])
        total = 0.0
        for m in range(gas):
            x = batch(s, m, case["global_rows"])
            for r in range(world):
                xr = x[r * rows:(r + 1) * rows]
                loss = model(input_ids=xr, labels=xr).loss
                (loss / (world * gas)).backward()
                total += loss.item()
        out["loss"].append(total / (world * gas))
        out["norm"].append(float(torch.nn.utils.clip_grad_norm_(params, case["clip"])))
        opt.step()
        sched.step()
        opt.zero_grad()
        out["states"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
    out["model"] = model
    return out


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert set(a) == set(b), set(a) ^ set(b)
    worst = max(((float((a[k].float() - b[k].float()).abs().max()), k) for k in a), default=(0.0, ""))
    return worst


def quiet():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
    except Exception:
        pass




# ---------------------------------------------------------------------------------------- ranks
def _train_worker(rank: int, world: int, case: dict) -> dict:
    quiet()
    import deepspeed

    deepspeed.init_distributed("gloo")
    engine, manager = build_engine(case)
    out = train_steps(engine, manager, case, rank, world, range(case["steps"]))
    out["state"] = manager.full_state_dict()
    out["memory"] = manager.memory_stats()
    out["ownership"] = [layer.ownership.experts for layer in manager.layers]
    out["budgets"] = dict(manager.prediction_budgets)
    out["shards"] = {layer.name: (layer.owned[0] if layer.owned else None, layer.local_count) for layer in manager.layers}
    return out


TOL = 2e-5  # fp32, 5 AdamW steps, eager reference vs expert-specific operators: rounding only


def _check_equivalence(case: dict, results: list[dict]) -> dict:
    ref = reference(case, case["steps"])
    r0 = results[0]
    assert r0["lr"] == pytest.approx(ref["lr"], rel=1e-12), "expert/dense LR schedule differs from the reference"
    assert r0["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    # one global norm over dense + expert gradients, and it was large enough that clipping acted
    assert r0["norm"] == pytest.approx(ref["norm"], rel=1e-4)
    assert min(ref["norm"]) > case["clip"]
    diff, where = max_diff(r0["state"], ref["states"][-1])
    init = make_model(case["experts"], case["top_k"]).state_dict()
    moved = {k: float((ref["states"][-1][k] - init[k]).abs().max()) for k in init}
    expert_keys = [k for k in init if ".experts." in k]
    assert min(moved[k] for k in expert_keys) > 50 * TOL, "experts barely trained: the comparison could not fail"
    assert diff < TOL, f"parameters differ from the single-process reference: {diff:.3g} at {where}"
    return ref


def _print_memory(case: dict, results: list[dict]) -> None:
    for r, res in enumerate(results):
        m = res["memory"]
        print(f"[fssdp memory] N={case['world']} rank {r}: expert state {m['expert_state_bytes']} B "
              f"(shards {m['shard_param_bytes']}, grads {m['grad_bytes']}, optimizer {m['optimizer_state_bytes']}), "
              f"cache {m['cache_bytes']} B, owned {res['shards']}")


def test_two_ranks_even_remat_prefetch_accumulation_skewed_routing():
    """2 ranks, even shards, re-materialization with prefetch, 2 micro-batches per step, clipping on;
    layer 0 sends every token to expert 2, layer 1 never uses expert 7 (the synchronous schedule)."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=2, global_rows=4, lr=3e-3, clip=0.3, steps=5,
                remat=True, prefetch=True, routing={0: ("hot", 2), 1: ("avoid", 7)}, schedule="sync")
    results = run_distributed(_train_worker, 2, case, init_process_group=False, timeout=400)
    _check_equivalence(case, results)
    _print_memory(case, results)
    S = (2 * 48 * 32 + 32 * 48) * 4  # bytes of one fp32 expert
    for step in range(case["steps"]):
        comms = [res["comm"][step] for res in results]
        for r, c in enumerate(comms):
            layer0 = {k for k in c["per_expert"] if k[0] == 0}
            assert layer0 <= {(0, 2)}, f"rank {r} moved unused layer-0 experts: {layer0}"
            assert (1, 7) not in c["per_expert"], f"rank {r} moved expert 7 of layer 1, which nobody used"
            assert c["regather_bytes"] <= c["gather_bytes"]
        # expert 2 (layer 0) is owned by rank 0 and used by both: one copy out and one gradient back per
        # micro-batch, plus its backward re-gather
        assert comms[0]["per_expert"][(0, 2)] == case["gas"] * 2 * S
        assert comms[1]["per_expert"][(0, 2)] == case["gas"] * S
        # every expert copy sent forward sends exactly one gradient back
        assert sum(c["gather_bytes"] for c in comms) == sum(c["reduce_bytes"] for c in comms)


def test_three_ranks_uneven_keep_zero1():
    """3 ranks, shard weights 2:1:1 (4/2/2 experts), weights kept for backward, no prefetch, ZeRO-1."""
    case = dict(world=3, experts=8, top_k=2, micro=1, gas=1, global_rows=3, lr=3e-3, clip=0.3, steps=5,
                remat=False, prefetch=False, stage=1, shard_weights=[2.0, 1.0, 1.0])
    results = run_distributed(_train_worker, 3, case, init_process_group=False, timeout=400)
    assert [r["shards"]["model.layers.0.mlp.experts"][1] for r in results] == [4, 2, 2]
    _check_equivalence(case, results)
    _print_memory(case, results)
    for res in results:
        for c in res["comm"]:
            assert c["regather_bytes"] == 0  # kept, not re-gathered
    totals = [sum(c["gather_bytes"] + c["reduce_bytes"] for c in res["comm"]) for res in results]
    assert all(t > 0 for t in totals)


# ------------------------------------------------------------------------- bad input, no ranks
def test_shard_model_rejects_bad_configs(one_rank_group):
    from ds_hexamoe.config import ConfigError, HexaMoEConfig
    from ds_hexamoe.fssdp import FSSDPManager

    model = make_model(4, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"hexamoe\.shard_weights: got 2 weights"):
        FSSDPManager.shard_model(model, HexaMoEConfig.from_dict({"sharding": "fssdp", "shard_weights": [1, 1]}))
    with pytest.raises(ConfigError, match=r"hexamoe\.sharding"):
        FSSDPManager.shard_model(model, HexaMoEConfig.from_dict({"sharding": "none"}))
    eager = make_model(4, 2, impl="eager")
    with pytest.raises(ConfigError, match='experts_implementation="hexamoe"'):
        FSSDPManager.shard_model(eager, HexaMoEConfig.from_dict({"sharding": "fssdp"}))
    # nothing was touched by the failed calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_single_rank_sharding_is_exact_and_state_dict_is_dense(one_rank_group):
    """World size 1: shards hold every expert; outputs and gradients equal the unsharded model's."""
    from ds_hexamoe.config import HexaMoEConfig
    from ds_hexamoe.fssdp import FSSDPManager, is_shard, shard_range

    ref, model = make_model(4, 2), make_model(4, 2)
    manager = FSSDPManager.shard_model(model, HexaMoEConfig.from_dict({"sharding": "fssdp"}))
    assert all(is_shard(p) and shard_range(p) == (0, 4) for p in manager.shard_parameters())
    assert not any(".experts." in k for k in model.state_dict())  # shards live in FSSDP checkpoints
    x = batch(0, 0, 2)
    a, b = ref(input_ids=x, labels=x).loss, model(input_ids=x, labels=x).loss
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    a.backward()
    b.backward()
    full = manager.full_state_dict()
    assert max_diff(full, ref.state_dict())[0] == 0.0
    g = manager.grads[(0, "gate_up_proj")]  # world size 1: the sum over ranks is the local gradient
    assert torch.allclose(g, ref.model.layers[0].mlp.experts.gate_up_proj.grad, atol=1e-6)
    # a full (Hugging Face) state dict loads into the shards
    model.load_state_dict(ref.state_dict())

"""PEFT LoRA on FSSDP-sharded experts, on real gloo ranks under DeepSpeed ZeRO-2.

A tiny Mixtral with LoRA on its experts (``target_parameters``) and attention (``target_modules``) trains through
``ds_hexamoe.initialize`` with ``"sharding": "fssdp"``; after several AdamW steps the adapters gathered with
``peft_adapter_state_dict`` must equal one plain process training PEFT with ``"eager"`` on the union of the
ranks' batches (``get_peft_model_state_dict``), and an adapter saved from them must load with
``PeftModel.from_pretrained`` on a fresh base model and give the reference's logits. Base experts stay frozen:
no gradient buffer, no optimizer state, no reduce bytes for them. Data-centric (both schedules),
expert-parallel, model-centric and the "hecate" mode.
"""
from __future__ import annotations

import os

import pytest
import torch

from ds_hexamoe.testing import run_distributed
from test_fssdp import batch, ds_config, quiet, train_steps
from test_fssdp import reference as fssdp_reference
from test_lora_experts import lora_config, mixtral, randomize_adapters

peft = pytest.importorskip("peft")

TOL = 2e-5  # fp32, a few AdamW steps: rounding only
BASE = dict(experts=4, top_k=2, micro=2, lr=3e-3, clip=0.3, stage=2, gas=2, global_rows=4, steps=4)


def lora_model(impl: str, seed: int = 1):
    model = peft.get_peft_model(mixtral(impl), lora_config())
    randomize_adapters(model, seed=seed)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def reference(case: dict) -> dict:
    """One process, PEFT on ``"eager"``, the union of every rank's batches (DeepSpeed's loss averaging)."""
    out = fssdp_reference(case, case["steps"], model=lora_model("eager"))
    out["adapter"] = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(out["model"]).items()}
    return out


def _engine(case: dict, seed: int = 1):
    import ds_hexamoe

    model = lora_model("hexamoe", seed=seed)
    cfg = ds_config(case)
    cfg["hexamoe"] = dict({"sharding": "fssdp"}, **case["hexamoe"])
    engine, _, _, _ = ds_hexamoe.initialize(model=model, model_parameters=trainable(model), config=cfg)
    return model, engine, engine.hexamoe.fssdp


class _NoFSSDP:
    """What ``train_steps`` reads from a manager, for the run without FSSDP."""

    @staticmethod
    def last_step_comm_stats() -> dict:
        return {}


def _worker(rank: int, world: int, case: dict) -> dict:
    quiet()
    import deepspeed

    from ds_hexamoe.experts import experts_modules
    from ds_hexamoe.experts.lora import has_lora
    from ds_hexamoe.fssdp import peft_adapter_state_dict, save_peft_adapter

    deepspeed.init_distributed("gloo")
    model, engine, manager = _engine(case)
    steps_manager = manager if manager is not None else _NoFSSDP()
    moves, reown = case.get("placements", {}), {}

    def before_step(s, _):
        if s in moves:
            manager.set_placement(0, moves[s])
        if s == case.get("reown_at"):  # load-aware re-ownership: adapters move with their optimizer state
            reown.update(manager.reown())

    out = train_steps(engine, steps_manager, case, rank, world, range(case["steps"]), before_step=before_step)
    out["reown"] = reown
    out["adapter"] = peft_adapter_state_dict(model)
    out["attached"] = all(has_lora(m) for _, m in experts_modules(model))  # the expert-specific path ran
    if manager is not None:
        out["grad_buffers"] = {f"{k[0]}:{k[1]}": g.numel() for k, g in manager.grads.items()}
        out["stepped"] = sorted(f"{e.key[0]}:{e.key[1]}" for e in manager.optimizer.stepped)
        out["reduce_bytes"] = [c.get("reduce_bytes", 0) for c in out["comm"]]
        out["gather_bytes"] = [c.get("gather_bytes", 0) for c in out["comm"]]
        out["widths"] = [(layer.grad_numel_per_expert, layer.numel_per_expert) for layer in manager.layers]
    if case.get("save"):  # a collective: rank 0 writes
        out["wrote"] = save_peft_adapter(model, case["save"])
    return out


def _check(case: dict, results: list[dict]) -> dict:
    ref = reference(case)
    r0 = results[0]
    assert all(r["attached"] for r in results)
    assert r0["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert r0["norm"] == pytest.approx(ref["norm"], rel=1e-4)
    if "stepped" in r0:
        assert all(r["adapter"] == {} for r in results[1:])  # rank 0 gets the tensors
    got, want = r0["adapter"], ref["adapter"]
    assert set(got) == set(want) and any(".experts." in k for k in want)
    init = peft.get_peft_model_state_dict(lora_model("eager"))
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert float((got[k] - want[k]).abs().max()) < TOL, k
        assert float((want[k] - init[k]).abs().max()) > 50 * TOL, f"{k} barely trained: the check could not fail"
    for r in results if "stepped" in results[0] else ():  # frozen base experts: no fp32 gradients, no state
        assert all(n == 0 for k, n in r["grad_buffers"].items() if k.endswith(("gate_up_proj", "down_proj")))
        assert r["stepped"] and all("_lora_" in k for k in r["stepped"])
    return ref


MODES = {
    "data_centric_sync": (2, {"mode": "data_centric", "fssdp": {"schedule": "sync"}}),
    "data_centric_hecate_schedule": (3, {"mode": "data_centric", "fssdp": {"schedule": "hecate"}}),
    "expert_parallel": (2, {"mode": "expert_parallel"}),  # from step 2: experts away from owners, replicas
    "hecate": (3, {"mode": "hecate"}),
    "model_centric": (3, {"mode": "model_centric"}),  # B1, A2 sliced by hidden unit; A1, B2 whole on every rank
    "not_sharded": (2, {"sharding": "none"}),  # PEFT's own parameters, DeepSpeed's ZeRO-2
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(MODES))
def test_lora_fssdp_equals_peft_eager(name, tmp_path):
    world, hexamoe = MODES[name]
    save = name == "data_centric_sync"
    case = dict(BASE, world=world, hexamoe=hexamoe, save=str(tmp_path / "adapter") if save else None)
    if name == "data_centric_hecate_schedule":
        case["reown_at"] = 2
    if name == "expert_parallel":  # rank 0 owns experts 0-1, rank 1 experts 2-3
        case["placements"] = {2: {0: [0, 1], 1: [1], 2: [0], 3: [0, 1]}}
    results = run_distributed(_worker, world, case, timeout=280, init_process_group=False)
    ref = _check(case, results)
    if "reown_at" in case:
        assert results[0]["reown"]["moved_experts"] > 0
    if hexamoe.get("sharding") != "none":
        assert sum(results[0]["reduce_bytes"]) > 0  # adapter gradients went to their owners
    if name == "data_centric_sync":  # gradients travel back along the gathers' routes, adapters only
        (grad_w, full_w), = set(results[0]["widths"])
        assert grad_w < full_w / 4
        sent = [sum(sum(r[kind]) for r in results) for kind in ("reduce_bytes", "gather_bytes")]  # all ranks
        assert sent[0] * full_w == sent[1] * grad_w > 0
    if save:
        assert [r["wrote"] for r in results] == [True] + [False] * (world - 1)
        loaded = peft.PeftModel.from_pretrained(mixtral("eager"), case["save"])
        ids = batch(99, 0, 3)
        with torch.no_grad():
            want, got = ref["model"](input_ids=ids).logits, loaded(input_ids=ids).logits
        assert float((got - want).abs().max()) < 1e-4


def _resume_worker(rank: int, world: int, case: dict, ckpt: str) -> dict:
    quiet()
    import deepspeed

    from ds_hexamoe.fssdp import peft_adapter_state_dict

    deepspeed.init_distributed("gloo")
    model, engine, manager = _engine(case)
    train_steps(engine, manager, case, rank, world, range(2))
    engine.save_checkpoint(ckpt, tag="s2")
    saved = peft_adapter_state_dict(model)
    cont = train_steps(engine, manager, case, rank, world, range(2, 4))
    # a model with other adapters resumes: the expert adapters come from FSSDP's files, attention's from DeepSpeed's
    model2, engine2, manager2 = _engine(case, seed=7)
    engine2.load_checkpoint(ckpt, tag="s2")
    loaded = peft_adapter_state_dict(model2)
    resumed = train_steps(engine2, manager2, case, rank, world, range(2, 4))
    return {"saved": saved, "loaded": loaded, "cont": cont["loss"], "resumed": resumed["loss"],
            "final": peft_adapter_state_dict(model), "final2": peft_adapter_state_dict(model2),
            "files": sorted(os.listdir(os.path.join(ckpt, "s2")))}


def _load_elsewhere_worker(rank: int, world: int, case: dict, ckpt: str) -> dict:
    quiet()
    import deepspeed

    from ds_hexamoe.fssdp import peft_adapter_state_dict

    deepspeed.init_distributed("gloo")
    model, engine, _ = _engine(dict(case, world=world), seed=7)
    # DeepSpeed cannot re-partition ZeRO's dense optimizer state over another world size (docs/fssdp.md)
    engine.load_checkpoint(ckpt, tag="s2", load_optimizer_states=False, expert_optimizer_states=True)
    return {"loaded": peft_adapter_state_dict(model)}


@pytest.mark.timeout(400)
def test_lora_fssdp_checkpoint_resumes_adapters(tmp_path):
    case = dict(BASE, world=2, hexamoe={"mode": "data_centric"})
    r0 = run_distributed(_resume_worker, 2, case, str(tmp_path), timeout=280, init_process_group=False)[0]
    assert any(f.startswith("fssdp_rank") for f in r0["files"])
    assert set(r0["loaded"]) == set(r0["saved"]) and any(".experts." in k for k in r0["saved"])
    for k in r0["saved"]:
        assert torch.equal(r0["loaded"][k], r0["saved"][k]), k
    assert r0["resumed"] == pytest.approx(r0["cont"], rel=1e-6)
    for k in r0["final"]:
        assert float((r0["final2"][k] - r0["final"][k]).abs().max()) < 1e-6, k
    # a 2-rank checkpoint loads on 3 ranks: the factors re-shard by expert id
    r3 = run_distributed(_load_elsewhere_worker, 3, case, str(tmp_path), timeout=200, init_process_group=False)[0]
    for k in r0["saved"]:
        assert torch.equal(r3["loaded"][k], r0["saved"][k]), k

"""FSSDP checkpoints: resuming gives the same next losses as an uninterrupted run, a 4-rank checkpoint
resumes on 2 ranks (experts and their optimizer state re-sharded by expert id), and full experts
export to a Hugging Face checkpoint that loads back."""
from __future__ import annotations

import os

import pytest
import torch

from ds_hexamoe.testing import run_distributed
from test_fssdp import build_engine, make_model, max_diff, quiet, train_steps

CASE = dict(world=4, experts=4, top_k=2, micro=1, gas=2, global_rows=4, lr=3e-3, clip=0.3, steps=5,
            remat=True, prefetch=True)
SAVE_AT = 3


def _expert_optimizer_rows(manager) -> dict:
    """This rank's expert optimizer state keyed by (layer, parameter, global expert id, state key)."""
    out = {}
    for e in manager.optimizer.entries:
        li, name = e.key
        owned = manager.layers[li].owned
        for k, v in manager.optimizer.state(e).items():
            if torch.is_tensor(v) and v.dim() >= 1:
                out.update({(li, name, owned[i], k): v[i].clone() for i in range(v.size(0))})
            else:
                out[(li, name, -1, k)] = torch.as_tensor(v).clone()
    return out


def _save_and_resume_worker(rank: int, world: int, case: dict, ckpt: str) -> dict:
    quiet()
    import deepspeed

    deepspeed.init_distributed("gloo")
    engine, manager = build_engine(case)
    train_steps(engine, manager, case, rank, world, range(SAVE_AT))
    engine.save_checkpoint(ckpt, tag="s3")
    own_saved = [layer.ownership.experts for layer in manager.layers]
    saved, saved_opt = manager.full_state_dict(), _expert_optimizer_rows(manager)
    cont = train_steps(engine, manager, case, rank, world, range(SAVE_AT, case["steps"]))
    final = manager.full_state_dict()
    # a fresh, differently initialized model resumes from the checkpoint on the same ranks
    engine2, manager2 = build_engine(case, seed=1)
    engine2.load_checkpoint(ckpt, tag="s3")
    own_loaded = [layer.ownership.experts for layer in manager2.layers]
    resumed = train_steps(engine2, manager2, case, rank, world, range(SAVE_AT, case["steps"]))
    return {"cont": cont, "resumed": resumed, "saved": saved, "saved_opt": saved_opt, "final": final,
            "own_saved": own_saved, "own_loaded": own_loaded,
            "final2": manager2.full_state_dict(), "files": sorted(os.listdir(os.path.join(ckpt, "s3")))}


def _resume_elsewhere_worker(rank: int, world: int, case: dict, ckpt: str, export: str) -> dict:
    quiet()
    import deepspeed

    deepspeed.init_distributed("gloo")
    engine, manager = build_engine(case, seed=1)
    # DeepSpeed cannot re-partition ZeRO's dense optimizer state over a new world size; FSSDP re-shards its own
    engine.load_checkpoint(ckpt, load_optimizer_states=False, expert_optimizer_states=True)  # tag from "latest"
    loaded, loaded_opt = manager.full_state_dict(), _expert_optimizer_rows(manager)
    resumed = train_steps(engine, manager, case, rank, world, range(SAVE_AT, case["steps"]))
    full = manager.full_state_dict()
    if rank == 0:
        manager.model.save_pretrained(export, state_dict=full)
    torch.distributed.barrier()
    return {"resumed": resumed, "loaded": loaded, "loaded_opt": loaded_opt, "final": full,
            "owned": [(layer.owned[0] if layer.owned else None, layer.local_count) for layer in manager.layers]}


def _union(dicts):
    out = {}
    for d in dicts:
        out.update(d)
    return out


def check_resharded(saved: list[dict], resumed: list[dict]) -> None:
    """A checkpoint of ``saved``'s ranks resumed on ``resumed``'s (another count): experts, dense weights and the
    experts' optimizer state come back exactly; the first step after resuming sees identical weights, later
    ones differ only through the dense Adam moments DeepSpeed restarts on a new world size."""
    r0, two = saved[0], resumed
    assert max_diff(two[0]["loaded"], r0["saved"])[0] == 0.0
    saved_opt, loaded_opt = _union(f["saved_opt"] for f in saved), _union(t["loaded_opt"] for t in two)
    assert set(saved_opt) == set(loaded_opt) and len(saved_opt) > 0
    assert all(torch.equal(saved_opt[k], loaded_opt[k]) for k in saved_opt)
    assert two[0]["resumed"]["loss"][0] == pytest.approx(r0["cont"]["loss"][0], rel=1e-6)
    assert two[0]["resumed"]["loss"] == pytest.approx(r0["cont"]["loss"], rel=1e-2)


def test_checkpoint_resume_same_and_fewer_ranks_and_hf_export(tmp_path):
    ckpt, export = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    four = run_distributed(_save_and_resume_worker, 4, CASE, ckpt, init_process_group=False, timeout=500)
    r0 = four[0]
    files = r0["files"]
    assert [f for f in files if f.startswith("fssdp_rank")] == [f"fssdp_rank{r:05d}.pt" for r in range(4)]
    assert "fssdp_index.json" in files and not [f for f in files if ".tmp" in f]
    # same ranks, fresh model: identical next losses, learning rates and parameters
    assert r0["resumed"]["loss"] == pytest.approx(r0["cont"]["loss"], rel=1e-6)
    assert r0["resumed"]["lr"] == r0["cont"]["lr"]
    assert max_diff(r0["final"], r0["final2"])[0] < 1e-6
    seed1 = make_model(CASE["experts"], CASE["top_k"], seed=1).state_dict()
    assert max_diff(r0["saved"], seed1)[0] > 1e-2  # the comparison could fail: a fresh model is far off

    case2 = dict(CASE, world=2, micro=2)
    two = run_distributed(_resume_elsewhere_worker, 2, case2, ckpt, export, init_process_group=False, timeout=500)
    assert [t["owned"] for t in two] == [[(0, 2), (0, 2)], [(2, 2), (2, 2)]]  # 1 expert per rank -> 2 per rank
    check_resharded(four, two)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export, experts_implementation="hexamoe")
    assert max_diff(dict(hf.state_dict()), two[0]["final"])[0] == 0.0

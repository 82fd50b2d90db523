"""Load-aware re-ownership (Hecate's heterogeneous sharding, ``fssdp.reshard_every``): the solver, and on
real gloo ranks training that stays equal to one process across re-ownerships (shards move with their
optimizer state, ownership becomes non-contiguous), resuming after one, and N->M re-sharding after one."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.testing import run_distributed
from test_fssdp import _check_equivalence, _train_worker, max_diff
from test_fssdp_checkpoint import _resume_elsewhere_worker, _save_and_resume_worker, _union


def test_load_aware_ownership_balances_and_prefers_the_using_node():
    from ds_hexamoe.fssdp.ownership import LayerOwnership, load_aware_ownership

    load = [1, 1, 1, 1, 1, 1, 10, 20]
    # ranks 0-1 on node 0, ranks 2-3 on node 1; the hottest expert (7) is used only by node 1's ranks
    usage = [[0.25] * 6 + [2.5, 0], [0.25] * 6 + [2.5, 0], [0.25] * 6 + [2.5, 10], [0.25] * 6 + [2.5, 10]]
    own = load_aware_ownership(load, usage, slots=[2, 2, 2, 2], ranks_per_node=2)
    assert [own.count(r) for r in range(4)] == [2, 2, 2, 2]
    per_rank = [sum(load[e] for e in own.owned(r)) for r in range(4)]
    contiguous = [sum(load[2 * r:2 * r + 2]) for r in range(4)]
    assert max(per_rank) < max(contiguous)  # 20 alone vs 30 for the contiguous split
    assert own.owner(7) in (2, 3) and own.owner(6) in (0, 1)  # hot experts on different nodes, 7 with its users
    assert not own.contiguous
    slots = load_aware_ownership(load, usage, slots=[3, 1, 3, 1], ranks_per_node=2)
    assert [slots.count(r) for r in range(4)] == [3, 1, 3, 1]  # shard weights decide the slots
    with pytest.raises(ValueError, match="owned twice"):
        LayerOwnership(4, ((0, 1), (1, 2, 3)))
    with pytest.raises(ValueError, match="no owner"):
        LayerOwnership(4, ((0, 1), (2,)))


def test_reownership_mid_training_stays_exact():
    """2 ranks, re-owned after steps 2 and 4 from skewed (layer 0) and natural (layer 1) loads."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=5,
                remat=True, prefetch=True, reshard_every=2, routing={0: ("switch", 1, 6, 3)})
    results = run_distributed(_train_worker, 2, case, init_process_group=False, timeout=400)
    _check_equivalence(case, results)
    owns = results[0]["ownership"]
    assert owns == results[1]["ownership"]
    start = [tuple(range(0, 4)), tuple(range(4, 8))]
    assert any(list(o) != start for o in owns), "re-ownership changed nothing: the test could not fail"
    assert any([e for ids in o for e in ids] != list(range(8)) for o in owns)  # non-contiguous somewhere


@pytest.mark.parametrize("mode", ["expert_parallel", "model_centric"])
def test_reownership_in_parallel_modes_stays_exact(mode):
    """Algorithm 2 in every mode (issue 22): expert-parallel and model-centric layers record their loads
    too, so ``reshard_every`` re-owns by load there; training stays equal to one process."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=4,
                remat=True, prefetch=True, reshard_every=2, mode=mode, routing={0: ("switch", 1, 6, 3)})
    results = run_distributed(_train_worker, 2, case, init_process_group=False, timeout=400)
    _check_equivalence(case, results)
    owns = results[0]["ownership"]
    assert owns == results[1]["ownership"]
    start = [tuple(range(0, 4)), tuple(range(4, 8))]
    assert any(list(o) != start for o in owns), f"{mode}: no load history, so re-ownership changed nothing"


def test_resume_and_n_to_m_after_reownership(tmp_path):
    """Re-owned at step 2, saved at step 3 on 2 ranks: resuming on 2 ranks adopts the saved (non-contiguous)
    ownership and continues like the uninterrupted run; 3 ranks load every expert and its optimizer state."""
    ckpt, export = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=5,
                remat=True, prefetch=True, reshard_every=2, routing={0: ("hot", 5)})
    two = run_distributed(_save_and_resume_worker, 2, case, ckpt, init_process_group=False, timeout=500)
    r0 = two[0]
    start = [tuple(range(0, 4)), tuple(range(4, 8))]
    assert any(list(o) != start for o in r0["own_saved"]), "nothing was re-owned before the save"
    assert r0["own_loaded"] == r0["own_saved"]
    # the resumed run re-owns from a shorter load window at step 4: only summation order may differ
    assert r0["resumed"]["loss"] == pytest.approx(r0["cont"]["loss"], rel=1e-6)
    assert max_diff(r0["final"], r0["final2"])[0] < 1e-5
    three = run_distributed(_resume_elsewhere_worker, 3, dict(case, world=3, global_rows=3, micro=1), ckpt, export,
                            init_process_group=False, timeout=500)
    assert max_diff(three[0]["loaded"], r0["saved"])[0] == 0.0
    saved_opt, loaded_opt = _union(t["saved_opt"] for t in two), _union(t["loaded_opt"] for t in three)
    assert set(saved_opt) == set(loaded_opt) and len(saved_opt) > 0
    assert all(torch.equal(saved_opt[k], loaded_opt[k]) for k in saved_opt)


def _replan_worker(rank: int, world: int, case: dict) -> dict:
    from test_fssdp import build_engine, quiet, train_steps

    quiet()
    import deepspeed

    from ds_hexamoe.fssdp.migrate import migrate_shards
    from ds_hexamoe.fssdp.ownership import load_aware_ownership, normalized_weights, split_experts
    from ds_hexamoe.fssdp.schedule import ranks_per_node

    deepspeed.init_distributed("gloo")
    engine, manager = build_engine(case)
    expected = {}

    def after_step(s, out):
        if s != 1:
            return
        # what a heterogeneity re-plan to shard weights [3, 1] should give: 6 + 2 experts, chosen by load
        w = normalized_weights([3.0, 1.0], world)
        for layer, calls in zip(manager.layers, manager.load_history().values()):
            usage = [[sum(c[q][e] for c in calls) for e in range(8)] for q in range(world)]
            load = [sum(u[e] for u in usage) for e in range(8)]
            counts = split_experts(8, w, layer=layer.index)
            expected[layer.index] = load_aware_ownership(load, usage, [counts.count(r) for r in range(world)],
                                                         ranks_per_node(world)).experts
        migrate_shards(manager, [3.0, 1.0])

    out = train_steps(engine, manager, case, rank, world, range(case["steps"]), after_step=after_step)
    out["state"] = manager.full_state_dict()
    out["ownership"] = [layer.ownership.experts for layer in manager.layers]
    out["expected"] = [expected[layer.index] for layer in manager.layers]
    return out


def test_replan_to_new_shard_weights_keeps_load_aware_ownership():
    """A heterogeneity re-plan's new shard weights give each rank its number of experts, but WHICH experts
    follows the load window (Hecate's Algorithm 2), not contiguous ranges; training stays exact."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=4,
                remat=True, prefetch=True, reshard_every=0, routing={0: ("hot", 5)})
    results = run_distributed(_replan_worker, 2, case, init_process_group=False, timeout=400)
    _check_equivalence(case, results)
    r0 = results[0]
    assert r0["ownership"] == r0["expected"] == results[1]["ownership"]
    assert [len(ids) for ids in r0["ownership"][0]] == [6, 2]
    contiguous = [tuple(range(0, 6)), tuple(range(6, 8))]
    assert list(r0["ownership"][0]) != contiguous, "the load-aware choice equals the contiguous one: cannot fail"


def _empty_rank_save_worker(rank: int, world: int, case: dict, ckpt: str) -> dict:
    from test_fssdp import build_engine, quiet, train_steps

    quiet()
    import deepspeed

    from ds_hexamoe.fssdp.migrate import migrate_shards

    deepspeed.init_distributed("gloo")
    engine, manager = build_engine(case)
    train_steps(engine, manager, case, rank, world, range(1))
    migrate_shards(manager, [1.0, 0.0])  # a re-plan that leaves rank 1 owning no expert
    out = train_steps(engine, manager, case, rank, world, range(1, 2))
    engine.save_checkpoint(ckpt, tag="after")
    return {"counts": [layer.local_count for layer in manager.layers], "loss": out["loss"]}


def test_checkpoint_after_a_rank_is_left_owning_no_expert(tmp_path):
    """A re-plan giving a rank no expert (a zero-element shard) used to fail the next save with DeepSpeed's
    'failed to find frozen Parameter': the engine's name table did not know the rebuilt shard."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=2,
                remat=True, prefetch=True, reshard_every=0)
    results = run_distributed(_empty_rank_save_worker, 2, case, str(tmp_path / "ckpt"), init_process_group=False,
                              timeout=400)
    assert results[1]["counts"] == [0, 0] and results[0]["counts"] == [8, 8]
    assert (tmp_path / "ckpt" / "after").is_dir()

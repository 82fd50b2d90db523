"""The ``"hecate"`` execution mode (Hecate's sparse materialization and token dispatch): a placement decided
every iteration from the load window (Algorithm 1), materialized from the FSSDP shards ahead of the layer,
tokens dispatched local first; N gloo ranks still equal one plain PyTorch process."""
from __future__ import annotations

import os

import pytest

from ds_hexamoe.testing import run_distributed
from test_fssdp import _check_equivalence, _train_worker


def test_algorithm_1_hot_experts_everywhere_or_slots_by_load():
    from ds_hexamoe.fssdp.hecate import hecate_placement, hot_count, window_loads
    from ds_hexamoe.fssdp.ownership import LayerOwnership

    own = LayerOwnership.from_starts(8, [0, 2, 4, 6, 8])  # 4 ranks, 2 experts each: 6 free slots per rank
    load = [50, 1, 1, 1, 30, 0, 1, 1]
    # t <= m: the t most loaded experts are copied to every rank; the rest stay on their owners
    p = hecate_placement(load, own, t=2, ranks_per_node=2)
    assert p[0] == p[4] == [0, 1, 2, 3]
    assert all(p[e] == [own.owner(e)] for e in (1, 2, 3, 5, 6, 7))
    # t > m (here every rank has 1 free slot): slots by load, a copy first on the node lacking the expert
    small = LayerOwnership.from_starts(3, [0, 1, 2, 3])  # 3 ranks x 1 expert: 2 free slots each
    p = hecate_placement([9, 5, 0], small, t=3, ranks_per_node=1)
    assert p[2] == [2]  # no load, no copy
    assert sum(len(r) - 1 for r in p.values()) <= 2 * 3
    assert len(p[0]) >= len(p[1]) and len(p[0]) == 3
    # nodes: rank 0 and 1 on node 0, rank 2 and 3 on node 1; expert 0 (owner 0) first goes to node 1
    p = hecate_placement([10, 0, 0, 0, 0, 0, 0, 0], own, t=7, ranks_per_node=2)
    assert p[0] == [0, 1, 2, 3]
    two = LayerOwnership(8, ((0, 1, 2, 3, 4, 5, 6), (7,)))  # rank 0 has 1 free slot: t > m
    p = hecate_placement([1, 1, 1, 1, 1, 1, 1, 9], two, t=3, ranks_per_node=1)
    assert p[7] == [0, 1]
    assert window_loads([[[1, 2], [3, 0]], [[0, 1], [1, 1]]], 2) == [5, 4]
    assert hot_count([10, 1, 1, 0]) == 1 and hot_count([0, 0]) == 0


def _hecate_worker(rank: int, world: int, case: dict) -> dict:
    if case.get("ranks_per_node"):
        os.environ["LOCAL_WORLD_SIZE"] = str(case["ranks_per_node"])
    out = _train_worker(rank, world, case)
    out["gathered"] = [c["gather_bytes"] for c in out["comm"]]
    return out


@pytest.mark.parametrize("world,extra", [
    (2, dict(budget=2, reshard_every=2)),  # re-ownership mid-run, an explicit t
    (2, dict(budget="auto", steps=6)),  # t from the measured window and link, agreed by every rank
    (3, dict(shard_weights=[2.0, 1.0, 1.0], ranks_per_node=1, remat=False, gas=2)),  # hot set as t, accumulation
    (4, dict(budget=2, reshard_every=2, ranks_per_node=2, gas=2)),  # two nodes: copies prefer the other node
])
def test_hecate_mode_is_exact_with_placements_changing_every_iteration(world, extra):
    """Layer 0's routing switches abruptly from expert 1 to expert 6 at step 3: the placement follows the
    window (copies of the hot expert gathered ahead), and parameters equal one process throughout."""
    case = dict(world=world, experts=8, top_k=2, micro=1, gas=1, global_rows={2: 4, 3: 3, 4: 4}[world],
                lr=3e-3, clip=0.3, steps=5, remat=True, prefetch=True, mode="hecate",
                routing={0: ("switch", 1, 6, 3)})
    case.update(extra)
    if world == 2:
        case["micro"] = 2
    results = run_distributed(_hecate_worker, world, case, init_process_group=False, timeout=500)
    _check_equivalence(case, results)
    if case["gas"] == 1:  # step 1 (one micro-step): no window yet, every expert runs on its owner
        assert all(res["gathered"][0] == 0 for res in results)
    # later steps copy the hot experts to the ranks that do not own them
    assert any(g > 0 for res in results for g in res["gathered"][1:])


def test_hecate_mode_needs_fssdp_and_uniform_profile():
    from ds_hexamoe.config import ConfigError, HexaMoEConfig

    with pytest.raises(ConfigError, match=r"hexamoe\.sharding"):
        HexaMoEConfig.from_dict({"mode": "hecate"}).validate()
    with pytest.raises(ConfigError, match=r"hexamoe\.profile"):
        HexaMoEConfig.from_dict({"mode": "hecate", "sharding": "fssdp", "profile": "declared",
                                 "devices": [{"name": "cpu"}]}).validate()


def _auto_worker(rank: int, world: int, case: dict) -> dict:
    """``"mode": "auto"`` with a plan that puts layer 0 in the "hecate" mode and layer 1 expert-parallel on the
    owners (what the planner's per-layer choice hands FSSDP)."""
    import deepspeed

    from test_fssdp import build_engine, quiet, train_steps

    quiet()
    deepspeed.init_distributed("gloo")
    engine, manager = build_engine(case)
    manager.set_modes({0: "hecate", 1: "expert_parallel"})
    out = train_steps(engine, manager, case, rank, world, range(case["steps"]))
    out["state"] = manager.full_state_dict()
    out["modes"] = manager.modes()
    out["gathered"] = [c["gather_bytes"] for c in out["comm"]]
    return out


def test_auto_runs_a_plan_with_hecate_layers_exactly():
    """The planner's "auto" may choose "hecate" for a layer: FSSDP then issues that layer's placement ahead
    (copies of the window's hot experts) and the parameters still equal one process. The synchronous
    schedule: the ahead gathers come from the "hecate" layer alone (expert parallel on owners gathers nothing)."""
    case = dict(world=2, experts=8, top_k=2, micro=2, gas=1, global_rows=4, lr=3e-3, clip=0.3, steps=5, remat=True,
                prefetch=True, mode="auto", schedule="sync", budget=2, routing={0: ("switch", 1, 6, 3)})
    results = run_distributed(_auto_worker, 2, case, init_process_group=False, timeout=500)
    _check_equivalence(case, results)
    assert sorted(set(results[0]["modes"].values())) == ["expert_parallel", "hecate"]
    assert any(g > 0 for res in results for g in res["gathered"][1:])

"""bubble_squeeze (the colocated gather-and-squeeze heuristic, once "asym_ea"): whole experts within memory,
never worse than its own gather step, close to the brute-force optimum of the per-layer synchronized time,
selectable in the planner; the old name is an error that names the new one."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ds_hexamoe.placement import squeeze as A
from ds_hexamoe.placement import solvers as S
from ds_hexamoe.placement.problem import layer_times, rank_times


def _problem(seed, L, E, R, slots=None, hop=True):
    rng = np.random.default_rng(seed)
    return S.PlacementProblem(
        loads=rng.integers(1, 100, size=(L, E)).astype(float), hops=[np.zeros((E, E))] * (L - 1),
        home=rng.dirichlet(np.ones(R)), pair_cost=rng.uniform(1, 3, R),
        hop_cost=rng.uniform(0.05, 0.3, R) if hop else np.zeros(R), host_cost=rng.uniform(0, 20, R),
        overlap=rng.uniform(0, 30, R), base=rng.uniform(0, 50, R), slots=np.array(slots or [E] * R))


def _best_whole(P):
    L, E, R = P.shape
    best = 0.0
    for l in range(L):  # layers are independent under the synchronized time
        layer = np.inf
        for assign in itertools.product(range(R), repeat=E):
            F = np.zeros((1, E, R))
            F[0, np.arange(E), assign] = 1.0
            if ((F > 0).sum(axis=1) > P.slots[None]).any():
                continue
            Q = S.PlacementProblem(P.loads[l:l + 1], [], P.home, P.pair_cost, P.hop_cost, P.host_cost, P.overlap,
                                   P.base / L, P.slots)
            layer = min(layer, layer_times(Q, F).max())
        best += layer
    return best


def test_layer_times_sum_to_rank_times():
    P = _problem(0, 3, 5, 3)
    F = np.random.default_rng(1).dirichlet(np.ones(3), size=(3, 5))
    np.testing.assert_allclose(layer_times(P, F).sum(axis=0), rank_times(P, F), rtol=1e-10)


@pytest.mark.parametrize("seed,L,E,R,slots", [(0, 2, 5, 2, None), (1, 2, 6, 3, None), (2, 3, 5, 3, [2, 2, 3]),
                                               (3, 1, 7, 2, [4, 4])])
def test_bubble_squeeze_whole_experts_near_optimum(seed, L, E, R, slots):
    P = _problem(seed, L, E, R, slots)
    res = S.solve("bubble_squeeze", P)
    assert set(np.unique(res.F)) <= {0.0, 1.0}  # whole experts only
    assert ((res.F > 0).sum(axis=1) <= P.slots[None]).all()
    gathered = A.bubble_squeeze(P, max_rounds=0)
    sync = res.meta["synchronized_s"]
    assert sync <= A.synchronized_time(P, gathered.F) * (1 + 1e-12)  # squeezing never makes it worse
    assert sync <= 1.1 * _best_whole(P)


def test_squeeze_fills_the_bubbles_gather_leaves():
    """A rank whose link is slow (costly to dispatch to) gathers nothing at first; its accumulated bubble
    is then filled with whole experts where that shortens a layer."""
    improved = 0
    for seed in range(12):
        P = _problem(seed, 3, 6, 3)
        res = A.bubble_squeeze(P)
        improved += res.meta["synchronized_s"] < A.synchronized_time(P, A.bubble_squeeze(P, max_rounds=0).F) * (1 - 1e-9)
    assert improved >= 1


def test_planner_takes_bubble_squeeze():
    from ds_hexamoe.experts.stats import synthetic_stats
    from ds_hexamoe.placement.planner import plan
    from ds_hexamoe.placement.profiles import load_profiles
    from ds_hexamoe.placement.shapes import ModelShape

    shape = ModelShape(hidden=1024, expert_ffn=2048, num_experts=8, top_k=2, num_moe_layers=4, seq_len=1024,
                       num_heads=16, vocab_size=8192)
    p = plan(load_profiles(["A40", "V100-32GB"]), synthetic_stats(4, 8, 500, 2, seed=0), global_batch=16,
             model_shape=shape, solver="bubble_squeeze", mode="expert_parallel")
    assert p.solver == "bubble_squeeze"
    assert all(len(ranks) == 1 for l in p.layers for ranks in p.placement[l].values())


def test_replica_units_when_ranks_outnumber_experts():
    """8 ranks, 3 experts: with replication (the default, as for eplb/ilp: 5 extra units per layer) the
    units are whole replicas on distinct ranks; replicas=0, the published whole-expert form, leaves ranks
    without experts and is slower."""
    P = _problem(4, 2, 3, 8, hop=False)
    P.host_cost[:] = 0.0
    rep = S.solve("bubble_squeeze", P)
    assert rep.meta["replicas"] == [5, 5] and ((rep.F > 0).sum(axis=(1, 2)) == 8).all()
    for l in range(2):
        for e in range(3):
            nz = rep.F[l, e][rep.F[l, e] > 0]
            assert np.allclose(nz, 1.0 / len(nz))  # whole replicas, each on its own rank
    P.replicas = 0
    whole = S.solve("bubble_squeeze", P)
    assert set(np.unique(whole.F)) <= {0.0, 1.0}
    assert rep.meta["synchronized_s"] < whole.meta["synchronized_s"]


def test_old_solver_name_is_an_error_naming_the_rename():
    from ds_hexamoe.config import ConfigError, HexaMoEConfig

    with pytest.raises(ConfigError, match=r"placement\.solver: 'asym_ea' was renamed 'bubble_squeeze'"):
        HexaMoEConfig.from_dict({"placement": {"solver": "asym_ea"}})

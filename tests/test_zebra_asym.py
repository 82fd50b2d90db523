"""HeterMoE's Asym-EA for zebra (placement/asym_ea.py) and the verdict on whole experts: gather-and-squeeze
fills the attention ranks' bubble within memory, the runtime accepts what it places, and the simulated step
sees routing skew that a fractional split hides."""
from __future__ import annotations

import numpy as np
import pytest

from ds_hexamoe.parallel.zebra import ZebraLayout
from ds_hexamoe.placement import asym_ea
from ds_hexamoe.placement.zebra import best_zebra, simulate_zebra

L, E = 4, 8


def _uniform():
    return np.ones((L, E))


def test_squeeze_fills_the_bubble_in_chunks_and_keeps_one_expert_per_expert_rank():
    # 2 attention ranks, 4 expert ranks 4x slower at experts than attention ranks are at attention: a bubble
    per_rank = np.array([1.0, 1.0, 8.0, 8.0, 8.0, 8.0])
    p = _uniform() / E
    owner = asym_ea.gather(p, [2, 3, 4, 5], per_rank, np.full(6, L * E))
    assert all(sorted(np.bincount(owner[l], minlength=6)[2:]) == [2, 2, 2, 2] for l in range(L))
    t_att = np.array([1.0, 1.0, 0, 0, 0, 0])
    new, moves = asym_ea.squeeze(owner, p, [0, 1], [2, 3, 4, 5], t_att, per_rank, np.full(6, L * E))
    assert moves and moves % 4 == 0  # chunks of n1 = N/M = 2 per attention rank, n2 = 1 from each expert rank
    for l in range(L):
        counts = np.bincount(new[l], minlength=6)
        assert counts[2:].min() >= 1 and counts.sum() == E
        assert counts[0] == counts[1]  # the chunk's experts split evenly between the attention ranks
    # what moved fits the accumulated bubble: the slowest side of the step's layers got shorter, and the
    # attention ranks never became the slower side by more than the bubble carried in from earlier layers
    def sides(o):
        busy = np.stack([asym_ea.rank_busy(o[l], p[l], per_rank) for l in range(L)])
        return (busy[:, :2] + t_att[:2]).max(1), busy[:, 2:].max(1)
    (a0, x0), (a1, x1) = sides(owner), sides(new)
    assert np.maximum(a1, x1).sum() < np.maximum(a0, x0).sum()
    assert (a1 - x1).max() <= (x0 - a0).sum()


def test_memory_caps_what_attention_ranks_take():
    per_rank = np.array([1.0, 8.0, 8.0])
    p = _uniform() / E
    caps = np.array([3, L * E, L * E])
    owner = asym_ea.gather(p, [1, 2], per_rank, caps)
    new, moves = asym_ea.squeeze(owner, p, [0], [1, 2], np.array([0.5, 0, 0]), per_rank, caps)
    assert 0 < moves <= 3 and (new == 0).sum() == moves
    assert asym_ea.gather(p, [1, 2], per_rank, np.array([0, 10, 10])) is None  # 32 experts, room for 20


def test_experts_spill_onto_attention_ranks_when_expert_ranks_are_full():
    p = _uniform() / E
    owner = asym_ea.gather(p, [1, 2], np.ones(3), np.array([L * E, 12, 12]), spill=[0])
    assert owner is not None and (owner == 0).sum() == L * E - 24
    assert all((np.bincount(owner[l], minlength=3)[1:] >= 1).all() for l in range(L))


def test_asym_ea_shortens_the_simulated_step_and_the_runtime_accepts_it():
    att, exp = [1.0, 1.0, 3.7, 3.7], [0.5, 0.5, 1.5, 1.5]  # expert ranks the slower side: a bubble
    est = best_zebra(att, exp, 16, L, 4, loads=_uniform())
    assert est.asym_ea_moves > 0 and est.step_time < est.gathered_step_time
    layout = ZebraLayout(tuple(est.attention), tuple(est.shares), tuple(map(tuple, est.owner)), 4)
    layout.check(len(att), E, L)  # the runtime's own check
    assert any(layout.hosted(a, l) for a in est.attention for l in range(L))


def test_the_verdict_sees_skew():
    att, exp = [1.0, 5.0, 5.0], [0.5, 2.0, 2.0]  # one attention rank, two expert ranks, balanced when even
    even = best_zebra(att, exp, 16, L, 4, loads=_uniform())
    hot = np.ones((L, E))
    hot[:, 0] = 20.0  # one expert takes ~3/4 of the pairs: whole, it lands on one expert rank
    skewed = best_zebra(att, exp, 16, L, 4, loads=hot)
    fractional = best_zebra(att, exp, 16, L, 4)  # the old verdict: the expert work split by speed
    assert skewed.step_time > even.step_time * 1.2
    assert even.step_time >= fractional.step_time - 1e-12  # whole experts never beat the fractional ideal
    hosted = asym_ea.fractions(np.array(skewed.owner), hot / hot.sum(1, keepdims=True), 3)
    again = simulate_zebra(att, exp, skewed.attention, skewed.experts, skewed.shares, L, 4, hosted=hosted)
    assert again == pytest.approx(skewed.step_time)


def test_no_split_with_more_expert_ranks_than_experts():
    att, exp = [1.0] + [3.7] * 5, [0.5] + [0.6] * 5
    est = best_zebra(att, exp, 16, 2, 2, loads=np.ones((2, 3)))
    assert len(est.experts) <= 3
    assert best_zebra(att[:3], exp[:3], 16, 2, 2, loads=np.ones((2, 3)), caps=np.zeros(3, int)) is None

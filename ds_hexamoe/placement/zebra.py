"""Simulated step of attention/expert disaggregation with the zebra pipeline, and the split that
minimizes it (docs/modes.md, "Zebra").

The schedule is the runtime's (``ds_hexamoe.parallel.zebra``): each attention rank walks layers, then
micro-batches, in order; each expert rank serves messages in (layer, micro-batch, attention rank) order;
backward runs the layers in reverse, the expert half of a layer before its attention half. Because both
sides are first-in first-out, one pass over that order gives the event times. Forward is a third of
the work, backward two thirds (as in :mod:`.simulator`). Every message (one micro-batch of one attention
rank to or from one expert rank) pays the link's latency and its bytes. An expert rank's share of the
expert work is fractional here (proportional to its expert speed); whole-expert rounding and memory are
not modelled. What the step pays once, at its end (:func:`zebra_advice`): the dense-gradient all-reduce
among attention ranks (none with one attention rank: only it holds the dense parameters; experts have
one owner each, so their gradients are never reduced) and the step's few small collectives.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# the runtime's forward dispatch of one micro-batch to one expert rank is three messages (count, tokens with
# their weights, expert indices); every other transfer is one
DISPATCH_MESSAGES = 3
# collectives at the end of a zebra step over all ranks (the global gradient norm, the step's metrics), and
# over the attention ranks when there are several (the loss's denominator, the dense gradients)
STEP_COLLECTIVES, DENSE_COLLECTIVES = 2, 2


@dataclass
class ZebraEstimate:
    """A simulated disaggregated step: who attends, their shares, expert fractions and the step time."""

    attention: list[int]
    experts: list[int]
    shares: list[int]
    expert_fraction: list[float]
    step_time: float


def simulate_zebra(att: Sequence[float], exp: Sequence[float], attention: Sequence[int], experts: Sequence[int],
                   shares: Sequence[int], layers: int, micro_batches: int, hop: float = 0.0,
                   fraction: Sequence[float] | None = None, latency: float = 0.0) -> float:
    """Seconds of one step. ``att[r]``: a sample's attention half of one layer on rank ``r`` (forward plus
    backward); ``exp[r]``: a sample's whole expert work of one layer on ``r``; ``hop``: seconds to move
    one sample's tokens one way; ``fraction``: each expert rank's part of the expert work (default: by speed);
    ``latency``: seconds every message pays beside its bytes."""
    att, exp = np.asarray(att, float), np.asarray(exp, float)
    if fraction is None:
        speed = np.array([1.0 / exp[x] for x in experts])
        fraction = speed / speed.sum()
    mb = {a: [len(part) for part in np.array_split(np.arange(s), micro_batches)] for a, s in zip(attention, shares)}
    a_free = {a: 0.0 for a in attention}
    x_free = {x: 0.0 for x in experts}
    ready = {a: [0.0] * micro_batches for a in attention}
    for phase, share in ((0, 1.0 / 3.0), (1, 2.0 / 3.0)):
        if phase == 1:  # the head's backward runs once every micro-batch's forward is back
            for a in attention:
                t = max([a_free[a], *ready[a]])
                ready[a] = [t] * micro_batches
        order = range(layers) if phase == 0 else range(layers - 1, -1, -1)
        for _layer in order:
            for j in range(micro_batches):
                for a in attention:
                    n = mb[a][j]
                    if phase == 0:  # attention, then the experts
                        a_free[a] = max(a_free[a], ready[a][j]) + n * att[a] * share
                        sent = a_free[a] + DISPATCH_MESSAGES * latency + n * hop
                    else:  # experts' backward first, on the gradients the attention rank sent
                        sent = ready[a][j] + latency + n * hop
                    back = sent
                    for x, f in zip(experts, fraction):
                        x_free[x] = max(x_free[x], sent) + n * f * exp[x] * share
                        back = max(back, x_free[x] + latency + n * f * hop)
                    if phase == 0:
                        ready[a][j] = back
                    else:
                        a_free[a] = max(a_free[a], back) + n * att[a] * share
                        ready[a][j] = a_free[a]
    return float(max([*a_free.values(), *x_free.values()]))


def best_zebra(att: Sequence[float], exp: Sequence[float], batch: int, layers: int, micro_batches: int = 4,
               hop: float = 0.0, latency: float = 0.0, sync=None) -> ZebraEstimate | None:
    """The fastest disaggregation: ranks sorted by how much slower they are at attention than at experts
    (comparative advantage), every split point tried; attention shares by attention speed. None when
    no split leaves each attention rank at least ``micro_batches`` samples. ``sync(attention)``: seconds
    the step pays at its end with those attention ranks (added to each split's time; default none)."""
    att, exp = np.asarray(att, float), np.asarray(exp, float)
    order = sorted(range(len(att)), key=lambda r: (att[r] / exp[r], r))
    best = None
    for k in range(1, len(att)):
        attention, experts = sorted(order[:k]), sorted(order[k:])
        w = np.array([1.0 / att[a] for a in attention])
        raw = w / w.sum() * batch
        shares = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - shares), kind="stable")[: batch - shares.sum()]:
            shares[i] += 1
        if shares.min() < micro_batches:
            continue
        speed = np.array([1.0 / exp[x] for x in experts])
        frac = speed / speed.sum()
        t = simulate_zebra(att, exp, attention, experts, shares.tolist(), layers, micro_batches, hop, frac, latency)
        t += sync(attention) if sync is not None else 0.0
        if best is None or t < best.step_time:
            best = ZebraEstimate(attention, experts, shares.tolist(), frac.tolist(), t)
    return best


def zebra_advice(cost, best_step: float, micro_batches: Sequence[int] = (1, 2, 4, 8)) -> dict | None:
    """What disaggregation would give on the planner's cost model (``costs.CostModel``), beside the best
    non-disaggregated plan's simulated ``best_step``, at the best of ``micro_batches``; None on one rank or
    when no split fits the batch. ``wins`` is the planner's verdict, which ``"hexamoe.zebra": {"enabled":
    "auto"}`` applies (``ds-hexamoe train``); it is reported in ``Plan.meta["zebra"]`` either way."""
    if cost.R < 2:
        return None
    att = cost.dense_per_sample / cost.L  # one layer's dense half, forward + backward, per sample
    exp = cost.seq * float(np.mean(cost.k)) * cost.pair_cost  # one layer's expert pairs of a sample
    hop = cost.seq * float(np.max(cost.hop_cost)) / 2.0  # one way, the slowest link
    tried = [(e, m) for m in micro_batches
             if (e := best_zebra(att, exp, cost.G, cost.L, m, hop, cost.latency, lambda a: zebra_sync(cost, a)))
             is not None]
    if not tried:
        return None
    est, micro_batches = min(tried, key=lambda t: t[0].step_time)
    sync = zebra_sync(cost, est.attention)
    step = est.step_time + float(np.max(cost.fixed))
    return {"step_time": step, "sync_time": sync, "attention_ranks": est.attention, "expert_ranks": est.experts,
            "shares": est.shares, "expert_fraction": est.expert_fraction, "micro_batches": micro_batches,
            "speedup_over_plan": best_step / step, "wins": step < best_step}


def zebra_sync(cost, attention: Sequence[int]) -> float:
    """Seconds a zebra step pays at its end: the collectives' latency, and a ring all-reduce of the dense
    gradients (``2 (k-1)/k`` of their bytes on the slowest attention link) among ``k`` > 1 attention ranks."""
    k = len(attention)
    t = cost.latency * (STEP_COLLECTIVES + DENSE_COLLECTIVES * (k > 1))
    if k > 1:
        m = cost.model
        t += 2.0 * (k - 1) / k * m.dense_params * m.grad_bytes / float(cost.bw[list(attention)].min())
    return t

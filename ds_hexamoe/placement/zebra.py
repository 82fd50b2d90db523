"""Simulated step of attention/expert disaggregation with the zebra pipeline, and the split that
minimizes it (docs/modes.md, "Zebra").

The schedule is the runtime's (``ds_hexamoe.parallel.zebra``): each attention rank walks layers, then
micro-batches, in order; each expert rank serves messages in (layer, micro-batch, attention rank) order;
backward runs the layers in reverse, the expert half of a layer before its attention half. Because both
sides are first-in first-out, one pass over that order gives the event times (per layer, running sums and
maxima over arrays, :func:`_fifo`). Forward is a third of the work, backward two thirds (as in
:mod:`.simulator`). Every message (one micro-batch of one attention rank to or from one expert rank) pays
the link's latency and its bytes. With routing statistics (the planner's verdict) the expert work is placed
as the runtime places it: whole experts with their loads, within each rank's memory, by :mod:`.asym_ea`
(gather onto the expert ranks; HeterMoE's squeeze onto the attention ranks where that is faster), per
layer; an attention rank's hosted experts add to its queue. Without them (``fraction``) each expert rank
takes a fraction of the work proportional to its speed. What the step pays once, at its end (:func:`zebra_advice`): the dense-gradient all-reduce
among attention ranks (none with one attention rank: only it holds the dense parameters; experts have
one owner each, so their gradients are never reduced) and the step's few small collectives.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import asym_ea

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
    splits_tried: int = 0  # splits simulated (of ranks - 1): fewer above EXHAUSTIVE_RANKS ranks
    owner: list | None = None  # [L][E] each expert's rank per layer (whole experts from routing statistics)
    asym_ea_moves: int = 0  # experts Asym-EA squeezed onto attention ranks (0: the gathered placement won)
    gathered_step_time: float | None = None  # the step with experts on expert ranks only


def simulate_zebra(att: Sequence[float], exp: Sequence[float], attention: Sequence[int], experts: Sequence[int],
                   shares: Sequence[int], layers: int, micro_batches: int, hop: float = 0.0,
                   fraction: Sequence[float] | None = None, latency: float = 0.0, hosted=None) -> float:
    """Seconds of one step. ``att[r]``: a sample's attention half of one layer on rank ``r`` (forward plus
    backward); ``exp[r]``: a sample's whole expert work of one layer on ``r``; ``hop``: seconds to move
    one sample's tokens one way; ``fraction``: each expert rank's part of the expert work (default: by speed);
    ``latency``: seconds every message pays beside its bytes; ``hosted [layers, ranks]``: every rank's part of
    each layer's expert work instead (attention ranks' parts run in their queue after their attention).

    Every queue here (an attention rank over its micro-batches, an expert rank over the messages) is
    first-in first-out, ``t = max(t, arrival) + work``, so one layer's pass is a few array scans
    (:func:`_fifo`) instead of a loop per message."""
    att, exp = np.asarray(att, float), np.asarray(exp, float)
    ex, at = np.asarray(experts, int), np.asarray(attention, int)
    if hosted is None:
        if fraction is None:
            speed = 1.0 / exp[ex]
            fraction = speed / speed.sum()
        hosted = np.zeros((1, len(att)))
        hosted[0, ex] = fraction
    hosted = np.asarray(hosted, float)
    s, m = np.asarray(shares, int)[:, None], np.arange(micro_batches)[None, :]
    n = (s // micro_batches + (m < s % micro_batches)).astype(float)  # [attention, micro-batch]: array_split's sizes
    ta = att[at][:, None]
    a_free, x_free = np.zeros(len(n)), np.zeros(len(ex))
    ready = np.zeros_like(n)
    for phase, share in ((0, 1.0 / 3.0), (1, 2.0 / 3.0)):
        if phase == 1:  # the head's backward runs once every micro-batch's forward is back
            ready[:] = np.maximum(a_free, ready.max(axis=1))[:, None]
        for layer in range(layers) if phase == 0 else range(layers - 1, -1, -1):
            h = hosted[layer % len(hosted)]
            f, c = h[ex], h[ex] * exp[ex]  # an expert rank's part, and its seconds per sample of a message
            if len(c) and np.ptp(c) <= 1e-12 * np.max(c):  # equal work on every expert rank: they move as one queue
                c, f = np.max(c, keepdims=True), np.max(f, keepdims=True)
            # an attention rank's hosted experts, on every attention rank's tokens of the micro-batch
            hw = (h[at] * exp[at])[:, None] * n.sum(axis=0)[None, :] * share
            if phase == 0:  # attention, then its own experts, while the other hosts compute theirs
                done = _fifo(a_free, ready, n * ta * share + hw)
                a_free, sent = done[:, -1], done - hw + DISPATCH_MESSAGES * latency + n * hop
            else:  # experts' backward first, on the gradients the attention rank sent
                sent = ready + latency + n * hop
            # the expert ranks serve messages in (micro-batch, attention rank) order
            order = sent.T.ravel()
            nt = n.T.ravel()
            xs = _fifo(x_free if len(c) == len(x_free) else np.full(len(c), x_free.max()), order[None, :],
                       nt[None, :] * c[:, None] * share)
            x_free = (xs[:, -1] if xs.shape[1] else x_free.max(keepdims=True)).repeat(len(ex) // len(c))
            back = np.maximum(order, (xs + latency + nt[None, :] * f[:, None] * hop).max(axis=0))
            back = back.reshape(n.shape[1], n.shape[0]).T
            if phase == 0:
                if hw.any():  # the attention hosts' outputs of micro-batch j are needed by every attention rank
                    back = np.maximum(back, np.where(hw > 0, done, 0.0).max(axis=0)[None, :])
                ready = back
            else:
                ready = _fifo(a_free, back, n * ta * share + hw)
                a_free = ready[:, -1]
    return float(max(a_free.max(initial=0.0), x_free.max(initial=0.0)))


def _fifo(free: np.ndarray, arrive: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Finish times of first-in first-out queues, one per row, ``t = max(t, arrive[i]) + work[i]`` along each row
    from ``t = free``: in closed form ``W_i + max(free, max_{j <= i} (arrive_j - W_{j-1}))`` with ``W`` the
    running sum of the work."""
    arrive = np.broadcast_to(arrive, work.shape)
    done = np.cumsum(work, axis=1)
    before = done - work
    return done + np.maximum(free[:, None], np.maximum.accumulate(arrive - before, axis=1))


# up to this many ranks every split is simulated; above, a grid of GRID_SPLITS evenly spaced splits and every
# split between the best grid point's neighbours (about 100 of 1023 at 1024 ranks): all R - 1 splits cost
# O(R^2 * layers * micro-batches), 17 s for Mixtral-8x7B's 32 layers at 512 ranks, and the step time moves
# smoothly with the split (the grid found the exhaustive split on every case checked, tests/test_plan_scale.py)
EXHAUSTIVE_RANKS, GRID_SPLITS = 256, 64


def best_zebra(att: Sequence[float], exp: Sequence[float], batch: int, layers: int, micro_batches: int = 4,
               hop: float = 0.0, latency: float = 0.0, sync=None, loads=None, caps=None) -> ZebraEstimate | None:
    """The fastest disaggregation: ranks sorted by how much slower they are at attention than at experts
    (comparative advantage), every split point tried (above ``EXHAUSTIVE_RANKS`` ranks a grid refined around
    its best point: ``ZebraEstimate.splits_tried``); attention shares by attention speed. None when no split
    leaves each attention rank at least ``micro_batches`` samples. ``sync(attention)``: seconds the step pays
    at its end with those attention ranks (added to each split's time; default none). ``loads [layers, E]``:
    routing statistics (pairs per expert): experts are then placed whole, per layer, within ``caps[r]`` (whole
    experts over all layers a rank's memory holds, or a function of the attention ranks and their shares;
    default unbounded), with and without Asym-EA, and a split
    with more expert ranks than experts (which the runtime refuses) is not tried."""
    att, exp = np.asarray(att, float), np.asarray(exp, float)
    order = sorted(range(len(att)), key=lambda r: (att[r] / exp[r], r))
    tried: dict[int, ZebraEstimate | None] = {}

    def split(k: int) -> ZebraEstimate | None:
        if k not in tried:
            tried[k] = _split(att, exp, order, k, batch, layers, micro_batches, hop, latency, sync, loads, caps)
        return tried[k]

    splits = range(1, len(att))
    if len(att) > EXHAUSTIVE_RANKS:
        grid = sorted({int(k) for k in np.linspace(1, len(att) - 1, GRID_SPLITS).round()})
        times = [e.step_time if (e := split(k)) is not None else np.inf for k in grid]
        i = int(np.argmin(times))
        splits = range(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)] + 1)
    best = None
    for k in sorted(set(splits) | set(tried)):
        e = split(k)
        if e is not None and (best is None or e.step_time < best.step_time):
            best = e
    if best is not None:
        best.splits_tried = len(tried)
    return best


def _split(att, exp, order, k, batch, layers, micro_batches, hop, latency, sync, loads=None,
           caps=None) -> ZebraEstimate | None:
    """The first ``k`` ranks of ``order`` attend, shares by attention speed; None when a share is under
    ``micro_batches`` samples, or (with ``loads``) the experts do not fit or are fewer than the expert ranks."""
    attention, experts = sorted(order[:k]), sorted(order[k:])
    w = 1.0 / att[attention]
    raw = w / w.sum() * batch
    shares = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - shares), kind="stable")[: batch - shares.sum()]:
        shares[i] += 1
    if shares.min() < micro_batches:
        return None
    t_sync = sync(attention) if sync is not None else 0.0
    if loads is not None:
        return _whole_experts(att, exp, attention, experts, shares.tolist(), layers, micro_batches, hop, latency,
                              t_sync, np.asarray(loads, float), caps)
    speed = 1.0 / exp[experts]
    frac = speed / speed.sum()
    t = simulate_zebra(att, exp, attention, experts, shares.tolist(), layers, micro_batches, hop, frac, latency)
    return ZebraEstimate(attention, experts, shares.tolist(), frac.tolist(), t + t_sync)


def _whole_experts(att, exp, attention, experts, shares, layers, micro_batches, hop, latency, t_sync, loads,
                   caps) -> ZebraEstimate | None:
    """A split with whole experts placed from routing statistics: gathered on the expert ranks, and squeezed
    by Asym-EA onto the attention ranks when the simulator finds that faster."""
    E = loads.shape[1]
    if len(experts) > E:
        return None
    p = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1e-300)
    per_rank = exp * sum(shares)  # a rank's seconds for a whole layer's expert work
    caps = np.full(len(att), layers * E) if caps is None else np.asarray(caps(attention, shares) if callable(caps) else caps)
    owner = asym_ea.gather(p, experts, per_rank, caps, spill=attention)
    if owner is None:
        return None

    def step(o):
        hosted = asym_ea.fractions(o, p, len(att))
        return simulate_zebra(att, exp, attention, experts, shares, layers, micro_batches, hop,
                              latency=latency, hosted=hosted) + t_sync

    t_att = np.zeros(len(att))
    t_att[attention] = np.asarray(shares) * att[attention]
    squeezed, moves = asym_ea.squeeze(owner, p, attention, experts, t_att, per_rank, caps)
    gathered_t = step(owner)
    squeezed_t = step(squeezed) if moves else np.inf
    best, t = (squeezed, squeezed_t) if squeezed_t < gathered_t else (owner, gathered_t)
    frac = asym_ea.fractions(best, p, len(att)).mean(axis=0)[experts]
    return ZebraEstimate(attention, experts, shares, frac.tolist(), t, owner=best.tolist(),
                         asym_ea_moves=moves if best is squeezed else 0, gathered_step_time=gathered_t)


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
             if (e := best_zebra(att, exp, cost.G, cost.L, m, hop, cost.latency, lambda a: zebra_sync(cost, a),
                                 cost.loads, lambda a, s: zebra_caps(cost, a, s))) is not None]
    if not tried:
        return None
    est, micro_batches = min(tried, key=lambda t: t[0].step_time)
    sync = zebra_sync(cost, est.attention)
    step = est.step_time + float(np.max(cost.fixed))
    return {"step_time": step, "sync_time": sync, "attention_ranks": est.attention, "expert_ranks": est.experts,
            "shares": est.shares, "expert_fraction": est.expert_fraction, "micro_batches": micro_batches,
            "speedup_over_plan": best_step / step, "wins": step < best_step, "split_search": _searched(est, cost.R),
            "expert_owner": est.owner, "asym_ea_moves": est.asym_ea_moves,
            "gathered_step_time": est.gathered_step_time + float(np.max(cost.fixed))}


def zebra_caps(cost, attention: Sequence[int], shares: Sequence[int]) -> np.ndarray:
    """Whole experts (parameters, gradients, optimizer state; over all layers) each rank's memory holds in a
    zebra split: what is left after the dense state and activations on attention ranks, all of it on expert
    ranks."""
    m = cost.model
    room = np.array(cost.mem, dtype=float)
    room[list(attention)] -= (m.dense_params * (m.param_bytes + m.grad_bytes + m.optimizer_bytes)
                              + np.asarray(shares, float) * cost.act_per_sample)
    unit = m.expert_params * (m.param_bytes + m.grad_bytes + m.optimizer_bytes)
    return np.floor(np.maximum(room, 0.0) / unit).astype(int)


def _searched(est: ZebraEstimate, ranks: int) -> str:
    """How the split was searched, for the printed plan: every split, or the grid's approximation."""
    if ranks <= EXHAUSTIVE_RANKS:
        return f"all {ranks - 1} splits"
    return (f"{est.splits_tried} of {ranks - 1} splits: a grid of {GRID_SPLITS} refined around its best point "
            f"(above {EXHAUSTIVE_RANKS} ranks)")


def zebra_sync(cost, attention: Sequence[int]) -> float:
    """Seconds a zebra step pays at its end: the collectives' latency, and a ring all-reduce of the dense
    gradients (``2 (k-1)/k`` of their bytes on the slowest attention link) among ``k`` > 1 attention ranks."""
    k = len(attention)
    t = cost.latency * (STEP_COLLECTIVES + DENSE_COLLECTIVES * (k > 1))
    if k > 1:
        m = cost.model
        t += 2.0 * (k - 1) / k * m.dense_params * m.grad_bytes / float(cost.bw[list(attention)].min())
    return t

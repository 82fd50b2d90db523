"""Predict a plan's step time and per-rank idle time from profiles and routing statistics.

The step is simulated event by event (:mod:`.timeline`), in the order the runtime runs it: per rank
forward through the layers (each layer's dense part with its share of the fixed per-step overhead, then
its MoE layer in the layer's mode), backward in reverse, then the optimizer step over its FSSDP shard
(memory-bound).
Every MoE layer synchronizes the ranks at its collectives (expert parallel: dispatch and combine;
data-centric: SparseAllGather and, where not hidden, its backward gather and gradient reduce-scatter;
model-centric: token all-gather and output reduce-scatter), so a rank that is slow at one layer makes the
others wait at that layer, even when the sums over the step balance. Traffic the runtime issues ahead
(prefetch, replica materialization up to what dense compute hides) runs on the communication stream.
A ``"hecate"`` layer places its experts by the plan's fractions (decided from earlier iterations' loads)
and is charged as :mod:`.dynamic` says: the copies' gathers hidden up to the ahead window, no calibration.
Forward is a third of a layer's FLOPs and backward two thirds; traffic splits evenly over the four
collectives of a layer. What every rank then pays once (per-collective latency, dense-gradient sync;
:meth:`CostModel.sync_time`) is added at the end: ``step = end of the last rank + sync``. ``busy`` is a
rank's own compute and traffic, ``idle = step - sync - busy`` its waiting (see :mod:`.costs` and
:mod:`.problem` for the per-layer formulas).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .costs import CostModel, integer_shares
from .dynamic import dispatch_fractions, dynamic_layer
from .plan import Plan
from .problem import EPS, layer_hops
from .timeline import Timeline
from .traffic import layer_bytes


@dataclass
class Simulation:
    step_time: float
    busy: list[float]
    idle: list[float]
    dense: list[float]
    moe: list[float]  # per rank: all MoE layers, compute and communication
    memory_gb: list[float]
    memory_limit_gb: list[float]
    segments: list[dict] = field(default_factory=list)  # consecutive layers of one mode: max over ranks
    sync: float = 0.0  # seconds of collective latency and dense-gradient sync, paid by every rank
    update: list[float] = field(default_factory=list)  # per rank: optimizer step over its FSSDP shard
    timeline: list[dict] = field(default_factory=list)  # events of one step (``simulate(..., timeline=True)``)
    sum_bound: float = 0.0  # max over ranks of busy time + sync: the step if nothing ever waited

    @property
    def memory_ok(self) -> bool:
        return all(u <= m * (1 + 1e-9) for u, m in zip(self.memory_gb, self.memory_limit_gb))

    def to_dict(self) -> dict:
        return asdict(self) | {"memory_ok": self.memory_ok}


def _segments(modes: list[str]) -> list[tuple[str, int, int]]:
    out, start = [], 0
    for i in range(1, len(modes) + 1):
        if i == len(modes) or modes[i] != modes[start]:
            out.append((modes[start], start, i))
            start = i
    return out


@dataclass
class _Layer:
    """One MoE layer per rank: expert compute (fwd + bwd), four collectives (seconds of traffic per rank,
    in order: forward before/after the experts, backward before/after), traffic hidden in forward and
    backward, and the expert-cache bytes it needs."""

    mode: str
    compute: np.ndarray
    coll: tuple[tuple[str, np.ndarray], ...]
    hidden: tuple[np.ndarray, np.ndarray]
    cache: np.ndarray


def _layers(plan: Plan, cost: CostModel, shares, sw, slices, F) -> list[_Layer]:
    P = cost.ep_problem(shares, sw, range(0, cost.L), true_affinity=True, base=np.zeros(cost.R))
    zero = np.zeros(cost.R)
    owned = np.array(integer_shares(sw, cost.E, what="experts"), dtype=float)  # FSSDP owners hold theirs
    out = []
    for l, mode in enumerate(plan.modes[x] for x in plan.layers):
        if mode == "hecate":  # the runtime's dispatch to the plan's holders from the shares in effect
            holders = [plan.placement[plan.layers[l]][e] for e in range(cost.E)]
            F[l] = dispatch_fractions(holders, shares / shares.sum(), cost.options.ranks_per_node or cost.R)
            out.append(_Layer(mode, *dynamic_layer(cost, P, l, F, owned, shares)))
        elif mode == "expert_parallel":
            compute = P.pair_cost * (P.loads[l] @ F[l])
            hosted = (F[l] > EPS).sum(axis=0)
            mat = hosted * P.host_cost
            exposed = np.maximum(0.0, mat - P.overlap)
            q = P.hop_cost * layer_hops(P, F, l) / 4.0
            out.append(_Layer(mode, compute, (("dispatch", q + exposed), ("combine", q), ("combine", q),
                                              ("dispatch", q)), (mat - exposed, zero), cost.cache_bytes(mode, hosted=hosted)))
        elif mode == "data_centric":
            compute, fwd, exposed, hid = cost.dc_parts(l, shares, sw)
            _, ahead = cost.dc_forward(l, shares, sw, compute)
            out.append(_Layer(mode, compute, (("gather", fwd), ("none", zero), ("gather", exposed), ("none", zero)),
                              (ahead, hid), cost.cache_bytes(mode)))
        else:
            compute, comm = cost.mc_parts(l, shares, slices)
            q = comm / 4.0
            out.append(_Layer(mode, compute, (("all_gather", q), ("reduce_scatter", q), ("reduce_scatter", q),
                                              ("all_gather", q)), (zero, zero), cost.cache_bytes(mode, slices=slices)))
    return out


def _run(tl: Timeline, layers: list[_Layer], dense_layer: np.ndarray, fixed_layer: np.ndarray,
         update: np.ndarray) -> None:
    """One step on the timeline: forward, backward (reverse layer order), optimizer step. The fixed
    per-step overhead (launches, Python) is spread over the layers like the dense work it comes with."""
    for l, x in enumerate(layers):
        tl.hidden(x.hidden[0], "materialize", l)
        tl.compute((dense_layer + fixed_layer) / 3.0, "dense", l)
        if x.coll[0][0] != "none":
            tl.collective(x.coll[0][1], x.coll[0][0], l)
        tl.compute(x.compute / 3.0, "experts", l)
        if x.coll[1][0] != "none":
            tl.collective(x.coll[1][1], x.coll[1][0], l)
    for l in reversed(range(len(layers))):
        x = layers[l]
        tl.hidden(x.hidden[1], "prefetch", l)
        if x.coll[2][0] != "none":
            tl.collective(x.coll[2][1], x.coll[2][0], l)
        tl.compute(x.compute * 2.0 / 3.0, "experts", l)
        if x.coll[3][0] != "none":
            tl.collective(x.coll[3][1], x.coll[3][0], l)
        tl.compute((dense_layer + fixed_layer) * 2.0 / 3.0, "dense", l)
    tl.compute(update, "optimizer")


def simulate(plan: Plan, cost: CostModel, timeline: bool = False) -> Simulation:
    """The predicted step of ``plan`` under ``cost`` (whose profiles, statistics and model it was made
    for); ``timeline=True`` also records every event (for :func:`~.report.save_timeline`)."""
    if plan.world_size != cost.R or plan.layers != cost.stats.layers:
        raise ValueError(f"simulate: the plan is for {plan.world_size} ranks and layers {plan.layers[:2]}..., the cost "
                         f"model for {cost.R} ranks and layers {cost.stats.layers[:2]}...")
    shares = np.asarray(plan.batch_shares, dtype=float)
    sw = np.asarray(plan.shard_weights, dtype=float)
    slices = np.array([hi - lo for lo, hi in plan.hidden_slices], dtype=float)
    layers = _layers(plan, cost, shares, sw, slices, plan.fractions(cost.E))
    dense = cost.dense_time(shares)
    update = cost.update_time(sw)
    tl = Timeline(cost.R, record=timeline)
    if layers:
        _run(tl, layers, dense / cost.L, cost.fixed / cost.L, update)
    else:  # no MoE layer: nothing synchronizes inside the step
        tl.compute(dense + cost.fixed + update, "dense")
    per_layer = [x.compute + sum(d for _, d in x.coll) for x in layers]
    moe = np.sum(per_layer, axis=0) if layers else np.zeros(cost.R)
    modes = [x.mode for x in layers]
    segments = [{"mode": m, "layers": [a, b], "time": float(np.sum(per_layer[a:b], axis=0).max())}
                for m, a, b in _segments(modes)]
    cache = np.max([x.cache for x in layers], axis=0) if layers else np.zeros(cost.R)
    sync = cost.sync_time(modes)
    busy = tl.busy
    step = tl.end + sync
    mem = cost.memory_used(sw, shares, cache)
    return Simulation(step, busy.tolist(), (tl.end - busy).tolist(), dense.tolist(), moe.tolist(),
                      (mem / 1e9).tolist(), (cost.mem / 1e9).tolist(), segments, sync, update.tolist(),
                      [e.to_dict() for e in tl.events], float(busy.max()) + sync)


def routing_bytes(modes: list[str], routing: list[list[np.ndarray]], hidden: int, elem_bytes: int = 4,
                  dest: list[list[np.ndarray] | None] | None = None) -> list[dict[str, list[int]]]:
    """Per MoE layer, the bytes each rank sends and receives in one step, counted from the concrete
    routing the step saw (``routing[l][r]``: rank ``r``'s top-k ids ``[T_r, k]``; ``dest[l][r]``: the
    expert-parallel destinations). Unlike the expected-pairs cost above, this equals the runtime's
    accounting exactly (:mod:`.traffic`)."""
    dest = dest or [None] * len(modes)
    return [layer_bytes(m, routing[l], hidden, elem_bytes, dest=dest[l]) for l, m in enumerate(modes)]


def uniform_plan(cost: CostModel) -> Plan:
    """The homogeneous baseline: equal batch shares and shards, data-centric layers, experts round-robin."""
    R, E, L = cost.R, cost.E, cost.L
    shares = integer_shares(np.ones(R), cost.G)
    F = np.zeros((L, E, R))
    for e in range(E):
        F[:, e, e % R] = 1.0
    placement, fractions = Plan.tables_from(cost.stats.layers, F)
    sl = integer_shares(np.ones(R), cost.model.expert_ffn, what="model.expert_ffn")
    bounds = np.concatenate([[0], np.cumsum(sl)])
    return Plan([p.name for p in cost.profiles], cost.G, cost.seq, shares, [1.0 / R] * R, list(cost.stats.layers),
                {l: "data_centric" for l in cost.stats.layers}, placement, fractions,
                [[int(bounds[r]), int(bounds[r + 1])] for r in range(R)], solver="uniform")


def ideal_step_time(cost: CostModel) -> float:
    """Total FLOPs over total speed (no communication, perfect balance): a lower bound of any plan."""
    return cost.ideal_step_time()

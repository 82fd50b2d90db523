"""Predict a plan's step time and per-rank idle time from profiles and routing statistics.

A rank's busy time is its dense compute, per MoE layer the time of the layer's mode (see :mod:`.costs`
and :mod:`.problem` for the formulas), its fixed per-step overhead and the optimizer step over its FSSDP
shard (memory-bound). The step ends when the busiest rank ends, plus the collective time every rank pays
(per-collective latency, dense-gradient sync; :meth:`CostModel.sync_time`): ``step = max_r busy_r +
sync``, ``idle_r = max_r busy_r - busy_r`` (waiting for peers). Waiting inside a step is not modelled per
layer (ranks that overlap micro-batches absorb it); the per-segment maxima are reported alongside.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .costs import CostModel, integer_shares
from .plan import Plan
from .problem import EPS, rank_times


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


def simulate(plan: Plan, cost: CostModel) -> Simulation:
    """The predicted step of ``plan`` under ``cost`` (whose profiles, statistics and model it was made for)."""
    if plan.world_size != cost.R or plan.layers != cost.stats.layers:
        raise ValueError(f"simulate: the plan is for {plan.world_size} ranks and layers {plan.layers[:2]}..., the cost "
                         f"model for {cost.R} ranks and layers {cost.stats.layers[:2]}...")
    shares = np.asarray(plan.batch_shares, dtype=float)
    sw = np.asarray(plan.shard_weights, dtype=float)
    slices = np.array([hi - lo for lo, hi in plan.hidden_slices], dtype=float)
    F = plan.fractions(cost.E)
    dense = cost.dense_time(shares)
    moe = np.zeros(cost.R)
    cache = np.zeros(cost.R)
    segments = []
    modes = [plan.modes[l] for l in plan.layers]
    for mode, a, b in _segments(modes):
        if mode == "expert_parallel":
            P = cost.ep_problem(shares, sw, range(a, b), true_affinity=True, base=np.zeros(cost.R))
            t = rank_times(P, F[a:b])
            hosted = (F[a:b] > EPS).sum(axis=1).max(axis=0)
            cache = np.maximum(cache, cost.cache_bytes(mode, hosted=hosted))
        elif mode == "data_centric":
            t = sum(cost.dc_layer(l, shares, sw) for l in range(a, b))
            cache = np.maximum(cache, cost.cache_bytes(mode))
        else:
            t = sum(cost.mc_layer(l, shares, slices) for l in range(a, b))
            cache = np.maximum(cache, cost.cache_bytes(mode, slices=slices))
        moe += t
        segments.append({"mode": mode, "layers": [a, b], "time": float(t.max())})
    update = cost.update_time(sw)
    busy = dense + moe + cost.fixed + update
    sync = cost.sync_time(modes)
    step = float(busy.max()) + sync
    mem = cost.memory_used(sw, shares, cache)
    return Simulation(step, busy.tolist(), (busy.max() - busy).tolist(), dense.tolist(), moe.tolist(),
                      (mem / 1e9).tolist(), (cost.mem / 1e9).tolist(), segments, sync, update.tolist())


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

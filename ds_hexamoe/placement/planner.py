"""The heterogeneity-aware planner: batch shares, shard weights, expert placement and per-layer modes.

``plan(profiles, stats, global_batch=..., model_shape=...)`` builds candidate plans and returns the one
the simulator predicts fastest (within memory):

- ``data_centric``: batch shares ``B_r ~ 1/t_r`` (HEXA-MoE; ``t_r`` the rank's time per sample for the
  dense part and its own experts), capped by memory; no token moves;
- ``expert_parallel``: batch shares by dense speed, experts placed by the chosen solver (``greedy`` =
  ``waterfill``: fractional water-filling, ``bubble_squeeze``: whole experts squeezed into per-layer bubbles, ``eplb``: DeepSeek
  EPLB replication, ``ilp``: MoETuner's ILP on HiGHS);
- ``model_centric``: hidden slices ``f_r ~ expert speed``;
- ``hecate``: FSSDP's ``"hecate"`` mode (:mod:`.dynamic`): the owners plus Algorithm 1's copies of the
  statistics' hot experts (the runtime renews them every iteration from its load window), tokens
  dispatched local first;
- ``mixed`` (mode "auto"): each layer in the mode the cost model predicts fastest for it.

Infeasible inputs (a model state larger than the cluster's memory, an expert larger than any device, a
batch the ranks cannot hold) raise :class:`~ds_hexamoe.config.ConfigError` before anything is solved.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..config import MODES, ConfigError
from ..devices import DeviceProfile
from ..experts.stats import RoutingStats
from .costs import CostModel, integer_shares
from .dynamic import hecate_fractions, layer_time, owned_counts
from .options import PlanOptions
from .plan import Plan
from .problem import PlacementProblem, rank_times
from .profiles import load_profiles
from .shapes import ModelShape, resolve_model
from .simulator import Simulation, ideal_step_time, simulate, uniform_plan
from .solvers import SOLVERS, solve
from .zebra import zebra_advice


def _as_profiles(profiles: Any) -> list[DeviceProfile]:
    if isinstance(profiles, list) and profiles and all(isinstance(p, DeviceProfile) and p.resolved for p in profiles):
        return profiles
    return load_profiles(profiles)


def _as_stats(stats: Any) -> RoutingStats:
    if isinstance(stats, RoutingStats):
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return RoutingStats.load_json(stats)
    return RoutingStats.from_dict(stats)


def ownership(sw: np.ndarray, E: int, L: int) -> np.ndarray:
    """``F[l, e, r] = 1`` for the FSSDP owner of each expert: contiguous ranges sized by shard weight."""
    counts = integer_shares(sw, E, what="experts")
    owner = np.repeat(np.arange(len(sw)), counts)
    F = np.zeros((L, E, len(sw)))
    F[:, np.arange(E), owner] = 1.0
    return F


def _make_plan(cost: CostModel, shares, sw, modes, F, solver: str) -> Plan:
    placement, fractions = Plan.tables_from(cost.stats.layers, F)
    sl = cost.hidden_slices()
    b = np.concatenate([[0], np.cumsum(sl)])
    return Plan([p.name for p in cost.profiles], cost.G, cost.seq, [int(s) for s in shares], [float(x) for x in sw],
                list(cost.stats.layers), dict(zip(cost.stats.layers, modes)), placement, fractions,
                [[int(b[r]), int(b[r + 1])] for r in range(cost.R)], solver=solver)


def _shares(cost: CostModel, sw, per_sample: np.ndarray, reserve: np.ndarray) -> list[int]:
    caps = cost.batch_caps(sw, reserve)
    return integer_shares(1.0 / per_sample, cost.G, caps)


def _expert_time_per_sample(cost: CostModel, dc_layers) -> np.ndarray:
    return cost.seq * sum((cost.k[l] for l in dc_layers), 0.0) * cost.pair_cost


class _Candidates:
    """Builds candidate plans; records why a candidate was not possible."""

    def __init__(self, cost: CostModel, sw: np.ndarray, solver: str):
        self.cost, self.sw, self.solver = cost, sw, solver
        self.plans: dict[str, Plan] = {}
        self.reasons: dict[str, str] = {}
        self.solver_result = None

    def add(self, name: str, fn) -> None:
        try:
            self.plans[name] = fn()
        except ConfigError as e:
            self.reasons[name] = str(e)

    def data_centric(self) -> Plan:
        c = self.cost
        t = c.dense_per_sample + _expert_time_per_sample(c, range(c.L))
        shares = _shares(c, self.sw, t, c.cache_bytes("data_centric"))
        return _make_plan(c, shares, self.sw, ["data_centric"] * c.L, ownership(self.sw, c.E, c.L), "data_centric")

    def model_centric(self) -> Plan:
        c = self.cost
        slices = np.array(c.hidden_slices(), dtype=float)
        shares = _shares(c, self.sw, c.dense_per_sample, c.cache_bytes("model_centric", slices=slices))
        return _make_plan(c, shares, self.sw, ["model_centric"] * c.L, ownership(self.sw, c.E, c.L), "model_centric")

    def _ep_shares(self) -> list[int]:
        c = self.cost
        fair = -(-c.E // c.R)  # leave room to host a fair share of each layer's experts
        return _shares(c, self.sw, c.dense_per_sample, np.full(c.R, fair * c.cache_unit * c.buffers))

    def hecate_F(self, shares) -> np.ndarray:
        """The ``"hecate"`` mode's fractions: Algorithm 1 on the statistics' loads (the runtime's window)."""
        c = self.cost
        owners = ownership(self.sw, c.E, 1)[0].argmax(axis=1)
        return hecate_fractions(c, c.loads, owners, shares, c.options.ranks_per_node or c.R, c.options.budget)

    def hecate(self) -> Plan:
        shares = self._ep_shares()
        return _make_plan(self.cost, shares, self.sw, ["hecate"] * self.cost.L, self.hecate_F(shares), "hecate")

    def expert_parallel(self) -> Plan:
        c = self.cost
        shares = self._ep_shares()
        res = solve(self.solver, c.ep_problem(shares, self.sw))
        self.solver_result = res
        return _make_plan(c, shares, self.sw, ["expert_parallel"] * c.L, res.F, self.solver)

    def mixed(self, ep: Plan) -> Plan:
        """Each layer in its fastest mode given the expert-parallel candidate's placement."""
        c = self.cost
        F = ep.fractions(c.E)
        shares = np.asarray(ep.batch_shares, dtype=float)
        slices = np.array(c.hidden_slices(), dtype=float)
        Fh = self.hecate_F(shares)
        P = c.ep_problem(shares, self.sw, true_affinity=True, base=np.zeros(c.R))
        owned = owned_counts(ownership(self.sw, c.E, 1)[0].argmax(axis=1), c.R)
        modes = []
        for l in range(c.L):
            P1 = c.ep_problem(shares, self.sw, range(l, l + 1), base=np.zeros(c.R))
            t = {"expert_parallel": rank_times(P1, F[l:l + 1]).max(),
                 "data_centric": c.dc_layer(l, shares, self.sw).max(),
                 "model_centric": c.mc_layer(l, shares, slices).max(),
                 "hecate": layer_time(c, P, l, Fh, owned, shares)}
            modes.append(min(t, key=t.get))  # a tie keeps the earlier mode: "hecate" only where it is faster
            if modes[-1] == "hecate":
                F[l] = Fh[l]
        if len(set(modes)) == 1:
            raise ConfigError(f"mixed: every layer prefers {modes[0]} (same as that candidate)")
        dc = [l for l, m in enumerate(modes) if m == "data_centric"]
        reserve = np.zeros(c.R)
        if dc:
            reserve = np.maximum(reserve, c.cache_bytes("data_centric"))
        if "model_centric" in modes:
            reserve = np.maximum(reserve, c.cache_bytes("model_centric", slices=slices))
        if "expert_parallel" in modes or "hecate" in modes:
            reserve = np.maximum(reserve, c.cache_bytes("expert_parallel", hosted=(F > 1e-12).sum(axis=1).max(axis=0)))
        new = _shares(c, self.sw, c.dense_per_sample + _expert_time_per_sample(c, dc), reserve)
        return _make_plan(c, new, self.sw, modes, F, f"mixed+{self.solver}")


def refine_shares(p: Plan, cost: CostModel, max_moves: int = 200, tries: int = 4) -> tuple[Plan, Simulation]:
    """Move samples from the busiest rank to the least busy one while the simulated step gets shorter
    (the proportional split ignores communication a batch share can hide), within memory."""
    sim = simulate(p, cost)
    step = max(1, cost.G // (4 * cost.R))
    moves = 0
    while step >= 1 and moves < max_moves:
        moves += 1
        busy = np.asarray(sim.busy)
        src = int(np.argmax(busy))
        improved = False
        for dst in np.argsort(busy)[:tries]:
            if dst == src or p.batch_shares[src] < step:
                continue
            shares = list(p.batch_shares)
            shares[src] -= step
            shares[int(dst)] += step
            q = Plan(**{**p.__dict__, "batch_shares": shares})
            s2 = simulate(q, cost)
            if s2.memory_ok and s2.step_time < sim.step_time * (1 - 1e-9):
                p, sim, improved = q, s2, True
                break
        if not improved:
            step //= 2
    return p, sim


def plan(profiles: Any, stats: Any, *, global_batch: int, model_shape: str | dict | ModelShape | None = None,
         options: PlanOptions | None = None, **changes: Any) -> Plan:
    """Plan training on the ranks of ``profiles`` (one per rank) for the routing in ``stats``.

    ``global_batch`` counts samples of ``model_shape.seq_len`` tokens. ``options``: how to plan (None: the
    defaults of :class:`PlanOptions`; training passes :meth:`PlanOptions.from_config`); keyword ``changes``
    replace single options (``mode="data_centric"``; ``memory_limits`` is ``memory_limits_gb``).
    """
    t0 = time.perf_counter()
    if "memory_limits" in changes:
        changes["memory_limits_gb"] = changes.pop("memory_limits")
    options = (options or PlanOptions()).replace(**changes)
    solver, mode = options.solver, options.mode
    if solver not in SOLVERS:
        raise ConfigError(f"solver: got {solver!r}; expected one of {sorted(SOLVERS)}")
    profiles = _as_profiles(profiles)
    stats = _as_stats(stats)
    model = resolve_model(model_shape, stats.model)
    cost = CostModel(profiles, stats, model, global_batch, options)
    sw = cost.shard_weights(options.shard_by)
    cost.check_expert_fits(sw)
    cands = _Candidates(cost, sw, solver)
    for m in (MODES + ("hecate",) if mode == "auto" else (mode,)):
        cands.add(m, getattr(cands, m))
    if mode == "auto" and "expert_parallel" in cands.plans:
        cands.add("mixed", lambda: cands.mixed(cands.plans["expert_parallel"]))
    if mode in ("auto", "data_centric"):
        cands.add("uniform", lambda: _make_plan(cost, integer_shares(np.ones(cost.R), cost.G), sw,
                                                ["data_centric"] * cost.L, ownership(sw, cost.E, cost.L), "uniform"))
    sims: dict[str, Simulation] = {}
    for n, p in list(cands.plans.items()):
        cands.plans[n], sims[n] = refine_shares(p, cost)
    for n, s in list(sims.items()):
        if not s.memory_ok:
            cands.reasons[n] = f"needs {max(s.memory_gb):.1f} GB on some rank, over its limit"
            del sims[n]
    if not sims:
        why = "; ".join(f"{n}: {r}" for n, r in cands.reasons.items())
        raise ConfigError(f"plan: no feasible plan for global_batch={global_batch} on these devices ({why})")
    best = min(sims, key=lambda n: sims[n].step_time)
    out = cands.plans[best]
    out.predicted = _predicted(cost, sims[best])
    res = cands.solver_result
    out.meta = {
        "candidate": best,
        "candidates": {n: s.step_time for n, s in sims.items()},
        "rejected": cands.reasons,
        "solver": solver,
        "solver_status": res.status if res is not None else None,
        "solver_wall_s": res.wall_s if res is not None else None,
        "solver_objective": res.objective if res is not None else None,
        "planner_wall_s": time.perf_counter() - t0,
        "model": model.to_dict(),
        "options": options.to_dict(),
    }
    # attention/expert disaggregation (zebra), simulated beside the chosen plan; "hexamoe.zebra" "auto" applies it
    out.meta["zebra"] = zebra_advice(cost, sims[best].step_time)
    out.meta["planner_wall_s"] = time.perf_counter() - t0  # zebra's search included
    return out


def _predicted(cost: CostModel, sb: Simulation) -> dict:
    """The chosen plan's simulation against the uniform plan and the ideal bound (``Plan.predicted``)."""
    su = simulate(uniform_plan(cost), cost)
    ideal = ideal_step_time(cost)
    return {
        "step_time": sb.step_time,
        "uniform_step_time": su.step_time,
        "uniform_memory_ok": su.memory_ok,
        "ideal_step_time": ideal,
        "speedup_vs_uniform": su.step_time / sb.step_time,
        "efficiency_vs_ideal": ideal / sb.step_time,
        "sync_time": sb.sync,
        "uniform_sync_time": su.sync,
        "sum_bound_step_time": sb.sum_bound,  # the step if no rank ever waited inside it (max-of-sums)
        "per_rank": {"busy": sb.busy, "idle": sb.idle, "dense": sb.dense, "moe": sb.moe, "memory_gb": sb.memory_gb,
                     "memory_limit_gb": sb.memory_limit_gb},
        "uniform_per_rank": {"busy": su.busy, "idle": su.idle},
        "segments": sb.segments,
    }


def problem_for(profiles: Any, stats: Any, *, global_batch: int, model_shape: Any = None, shares=None,
                **options) -> tuple[PlacementProblem, CostModel]:
    """The expert-parallel placement problem the planner would solve (for benchmarks and tests)."""
    profiles, stats = _as_profiles(profiles), _as_stats(stats)
    cost = CostModel(profiles, stats, resolve_model(model_shape, stats.model), global_batch, PlanOptions(**options))
    sw = cost.shard_weights()
    if shares is None:
        fair = -(-cost.E // cost.R)
        shares = _shares(cost, sw, cost.dense_per_sample, np.full(cost.R, fair * cost.cache_unit * cost.buffers))
    return cost.ep_problem(shares, sw), cost

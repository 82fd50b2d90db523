"""Expert placement solvers behind one interface (a registry, MegaBlocks-style).

Every solver maps a :class:`~.problem.PlacementProblem` to a fraction matrix ``F[l, e, r]`` scored by the
same :func:`~.problem.rank_times`. Here: ``waterfill`` (also registered as ``greedy``, its old name: fill
ranks with load in proportion to speed, splitting experts into token fractions), ``bubble_squeeze`` (a
colocated expert-parallel heuristic: whole experts gathered by expert speed, then squeezed into the ranks
with the most accumulated per-layer bubble: :mod:`.squeeze`) and ``eplb`` (DeepSeek EPLB: replicate
the heaviest experts, pack replicas onto the rank that finishes first); ``ilp`` (MoETuner) registers from
:mod:`.ilp` (docs/design.md, "Heterogeneous placement").
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..config import ConfigError
from .problem import EPS, PlacementProblem, SolverResult, check_solution, layer_hops, objective, rank_times


# ------------------------------------------------------------------------------------------- registry
SOLVERS: dict[str, Callable[[PlacementProblem], SolverResult]] = {}


def register_solver(name: str):
    def deco(fn):
        SOLVERS[name] = fn
        return fn
    return deco


def solve(name: str, P: PlacementProblem) -> SolverResult:
    if name not in SOLVERS:
        raise ConfigError(f"solver: got {name!r}; expected one of {sorted(SOLVERS)}")
    P.check()
    t0 = time.perf_counter()
    res = SOLVERS[name](P)
    res.wall_s = time.perf_counter() - t0
    check_solution(P, res.F)
    return res


# --------------------------------------------------------------------------------------------- greedy
def _waterfill(cur: np.ndarray, cost: np.ndarray, work: float) -> np.ndarray:
    """Pairs per rank so that ``cur_r + x_r cost_r`` is level: ``sum x = work`` (bisection on the level)."""
    lo, hi = cur.min(), cur.max() + work * cost.max() + 1e-30
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if (np.maximum(0.0, mid - cur) / cost).sum() < work:
            lo = mid
        else:
            hi = mid
    return np.maximum(0.0, hi - cur) / cost


@register_solver("greedy")
@register_solver("waterfill")
def greedy(P: PlacementProblem, min_fraction: float = 0.02) -> SolverResult:
    """Fractional water-filling: per layer, water-fill rank capacity by speed, then fill the heaviest
    experts into the roomiest ranks, splitting an expert when a rank's room runs out (fragments under
    ``min_fraction`` of the expert stay whole). Ignores affinity."""
    L, E, R = P.shape
    F = np.zeros((L, E, R))
    # hosting a piece costs its materialization beyond what dense compute hides: a piece smaller than
    # the pairs that time could compute is not worth splitting off
    fixed = np.maximum(0.0, P.host_cost - P.overlap)
    worth = fixed / P.pair_cost
    for l in range(L):
        # the runtime synchronizes every layer: level each layer on its own, from its share of the dense work
        cur = P.base / L + P.hop_cost * layer_hops(P, np.zeros((L, E, R)), l)
        load = P.loads[l]
        cap = _waterfill(cur + fixed, P.pair_cost, float(load.sum()))
        slots = np.minimum(P.slots, E).astype(int).copy()
        assigned = np.zeros(R)
        order = np.argsort(-load, kind="stable")
        for pos, e in enumerate(order):
            need, hosts = float(load[e]), set()
            later = E - pos - 1  # experts still to place after this one: each needs a slot
            if need <= 0:  # an idle expert still needs a home (memory only)
                cand = [r for r in range(R) if slots[r] > 0]
                r = max(cand, key=lambda r: slots[r])
                F[l, e, r], slots[r] = 1.0, slots[r] - 1
                continue
            while need > 1e-9 * load[e]:
                cand = [r for r in range(R) if slots[r] > 0 and r not in hosts]
                if not cand:
                    raise ConfigError(f"placement: layer {l}, expert {e} finds no rank with a free slot; "
                                      "total memory is too small for this model and batch")
                r = max(cand, key=lambda r: cap[r])
                if cap[r] <= max(min_fraction * load[e], worth[r]):
                    r = min(cand, key=lambda r: cur[r] + fixed[r] + (assigned[r] + need) * P.pair_cost[r])
                    take = need
                else:
                    take = min(need, cap[r])
                    # a split costs a slot here and one more for the rest: keep one for every later expert
                    if need - take < max(min_fraction * load[e], worth[r]) or slots.sum() - 2 < later:
                        take = need
                F[l, e, r] += take / load[e]
                cap[r] -= take
                assigned[r] += take
                need -= take
                hosts.add(r)
                slots[r] -= 1
        F[l] /= F[l].sum(axis=1, keepdims=True)
    return SolverResult(F, objective(P, F), "ok", 0.0)


# ----------------------------------------------------------------------------------------------- eplb
def replica_counts(load: np.ndarray, units: int, R: int) -> np.ndarray:
    """EPLB's replication: give the next replica to the expert with the largest load per replica."""
    n = np.ones(len(load), dtype=int)
    for _ in range(units - len(load)):
        ratio = np.where(n < R, load / n, -1.0)
        e = int(np.argmax(ratio))
        if ratio[e] < 0:
            break
        n[e] += 1
    return n


def _units(P: PlacementProblem) -> list[np.ndarray]:
    L, E, R = P.shape
    u = P.n_units()
    return [replica_counts(P.loads[l], u, R) for l in range(L)]


@register_solver("eplb")
def eplb(P: PlacementProblem) -> SolverResult:
    """Replicate the heaviest experts, then pack replicas (heaviest first) onto the rank whose time grows
    least, each replica of an expert on a different rank, within memory slots."""
    L, E, R = P.shape
    F = np.zeros((L, E, R))
    for l, n in enumerate(_units(P)):
        cur = P.base / L  # every layer synchronizes: pack each from its share of the dense work
        units = sorted(((P.loads[l, e] / n[e], e) for e in range(E) for _ in range(n[e])), key=lambda t: -t[0])
        slots = np.minimum(P.slots, E).astype(int).copy()
        for w, e in units:
            # the rank with the least time after it, then the most free slots, then the lowest index (arrays,
            # not a loop over ranks: L * max(E, R) units times R ranks was minutes at 1024 ranks)
            t = np.where((slots > 0) & (F[l, e] == 0), cur + w * P.pair_cost, np.inf)
            least = t.min()
            if least == np.inf:
                raise ConfigError(f"placement: layer {l}, expert {e} finds no rank with a free slot; "
                                  "total memory is too small for this model and batch")
            tied = np.flatnonzero(t == least)
            r = int(tied[np.argmax(slots[tied])])
            F[l, e, r] = 1.0 / n[e]
            cur[r] += w * P.pair_cost[r]
            slots[r] -= 1
    return SolverResult(F, objective(P, F), "ok", 0.0, {"replicas": [int(n.sum()) - E for n in _units(P)]})


__all__ = ["EPS", "PlacementProblem", "SOLVERS", "SolverResult", "check_solution", "eplb", "greedy", "objective",
           "rank_times", "register_solver", "replica_counts", "solve"]

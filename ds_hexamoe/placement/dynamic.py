"""The cost of a layer whose placement is renewed every iteration: FSSDP's ``"hecate"`` mode (Hecate's
sparse materialization, Algorithm 1) and dynamic shadowing (FasterMoE's, as a baseline), as the runtime
runs them.

A ``"hecate"`` layer, per rank (``fssdp/hecate.py``, ``fssdp/schedule.py``):

- placement: every expert on its FSSDP owner, plus the copies Algorithm 1 hands out from the load window
  (:func:`hecate_holders`: the same function the runtime calls); ``t`` is ``fssdp.budget``: an integer,
  ``"auto"`` (the window between the ahead gather's issue and its use at the link's bandwidth, the
  runtime's :func:`~ds_hexamoe.fssdp.budget.auto_budget`), or None (the experts above the window's mean);
- dispatch: a pair goes to a local copy, else a copy on its node, else any holder, split evenly
  (:func:`dispatch_fractions`), home -> expert -> home at every layer: dispatch and combine, forward and
  backward;
- materialization: the copies are gathered ahead, issued when the previous layer's experts run: hidden
  up to that window (:meth:`CostModel.ahead_window`), the rest exposed at the dispatch. The copies are
  kept for backward (no re-gather); their gradients go back to the owners asynchronously under backward,
  exposed only beyond the layer's backward dense compute;
- no calibration: experts the window missed run on their owners (the runtime has no calibration gather
  in this mode), which the scored loads then charge as imbalance.

Dynamic shadowing (:func:`shadow_holders`) decides on the current iteration's loads (its gate output), so
its broadcast cannot be issued ahead: a cost model whose ``ahead_window`` is zero charges it exposed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..fssdp.budget import auto_budget
from ..fssdp.hecate import hecate_placement, hot_count
from ..fssdp.ownership import LayerOwnership
from .problem import EPS, PlacementProblem, layer_hops


def dispatch_fractions(holders: Sequence[Sequence[int]], home: np.ndarray, ranks_per_node: int) -> np.ndarray:
    """``F[e, r]``: the share of expert ``e``'s pairs rank ``r`` computes when each home rank sends its pairs
    to a local holder, else the holders on its node, else every holder, split evenly (the runtime's
    ``parallel.replicas.assign_destinations``); ``home[q]``: the share of pairs that start on rank ``q``."""
    home = np.asarray(home, dtype=float)
    R = len(home)
    node = np.arange(R) // max(1, ranks_per_node)
    nodes = int(node[-1]) + 1 if R else 0
    F = np.zeros((len(holders), R))
    for e, hs in enumerate(holders):  # O(R) per expert: thousands of ranks stay cheap
        has = np.zeros(R, dtype=bool)
        has[list(hs)] = True
        away = np.bincount(node, weights=np.where(has, 0.0, home), minlength=nodes)  # pairs without a local copy
        near = np.bincount(node, weights=has.astype(float), minlength=nodes)  # holders per node
        F[e] = np.where(has, home, 0.0)
        F[e] += np.where(has, away[node] / np.maximum(near[node], 1), 0.0)  # to the holders of their node
        F[e] += np.where(has, away[near == 0].sum() / has.sum(), 0.0)  # nodes without one: to every holder
    return F


def _ownership(owners: Sequence[int], R: int) -> LayerOwnership:
    return LayerOwnership(len(owners), tuple(tuple(e for e, o in enumerate(owners) if o == r) for r in range(R)))


def budget_t(budget, load: np.ndarray, window: np.ndarray, bandwidth: np.ndarray, expert_bytes: float,
             free: np.ndarray) -> int:
    """Algorithm 1's ``t`` as the runtime sets it from ``fssdp.budget`` (module docstring); under ``"auto"``
    the smallest of the ranks' budgets (each at most its ``free[r]`` slots), as every rank takes the minimum
    of the exchanged ones."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        return budget
    if budget == "auto":
        return min(auto_budget(float(w), float(b), int(expert_bytes), int(f))
                   for w, b, f in zip(window, bandwidth, free))
    return hot_count([float(v) for v in load])


def hecate_holders(load: np.ndarray, owners: Sequence[int], t: int, ranks_per_node: int) -> list[list[int]]:
    """Per expert, the ranks holding it: Algorithm 1 (:func:`ds_hexamoe.fssdp.hecate.hecate_placement`) on the
    window's ``load[E]``."""
    R = max(owners) + 1 if len(owners) else 0
    p = hecate_placement([float(v) for v in load], _ownership(owners, R), t, ranks_per_node)
    return [p[e] for e in range(len(owners))]


def shadow_holders(owners: Sequence[int], R: int, order: Sequence[int], s: int) -> list[list[int]]:
    """Owners, with the first ``s`` experts of ``order`` shadowed on every rank."""
    out = [[int(o)] for o in owners]
    for e in list(order)[:s]:
        out[e] = list(range(R))
    return out


def owned_counts(owners: Sequence[int], R: int) -> np.ndarray:
    return np.bincount(np.asarray(owners, dtype=int), minlength=R).astype(float)


def dynamic_layer(cost, P: PlacementProblem, l: int, F: np.ndarray, owned: np.ndarray, shares):
    """A ``"hecate"`` layer per rank: ``(compute, collectives, hidden (forward, backward), cache bytes)`` in
    the simulator's layout (four collectives: forward dispatch and combine, backward combine and
    dispatch); ``F`` the layer's ``[L, E, R]`` fractions, ``owned[r]`` the experts rank ``r`` owns."""
    m = cost.model
    compute = P.pair_cost * (P.loads[l] @ F[l])
    hosted = (F[l] > EPS).sum(axis=0)
    copies = np.maximum(0.0, hosted - owned)
    gather = copies * m.expert_bytes / cost.bw
    window = cost.ahead_window(shares, l)
    late = np.maximum(0.0, gather - window)
    grads = copies * m.expert_grad_bytes / cost.bw
    room = cost.dense_time(shares) / cost.L * 2.0 / 3.0
    grads_late = np.maximum(0.0, grads - room)
    q = P.hop_cost * layer_hops(P, F, l) / 4.0
    colls = (("dispatch", q + late), ("combine", q), ("combine", q), ("dispatch", q + grads_late))
    return compute, colls, (gather - late, grads - grads_late), cost.cache_bytes("hecate", hosted=hosted)


def layer_time(cost, P: PlacementProblem, l: int, F: np.ndarray, owned: np.ndarray, shares) -> float:
    """The slowest rank's seconds in layer ``l`` (compute plus its collectives): how the planner and the
    shadowing policy compare one layer's options."""
    compute, colls, _, _ = dynamic_layer(cost, P, l, F, owned, shares)
    return float((compute + sum(d for _, d in colls)).max())


def hecate_fractions(cost, window_loads: np.ndarray, owners: Sequence[int], shares, ranks_per_node: int,
                     budget=None) -> np.ndarray:
    """``F[L, E, R]`` of a ``"hecate"`` step: per layer, Algorithm 1 on ``window_loads[l]`` (the loads of the
    iterations before the step, never the step's own) and the runtime's dispatch."""
    shares = np.asarray(shares, dtype=float)
    home = shares / shares.sum()
    R = cost.R
    free = cost.E - owned_counts(owners, R)  # the cache's slots beside a rank's own experts
    out = np.zeros((cost.L, cost.E, R))
    for l in range(cost.L):
        t = budget_t(budget, window_loads[l], cost.ahead_window(shares, l), cost.bw, cost.model.expert_bytes, free)
        out[l] = dispatch_fractions(hecate_holders(window_loads[l], owners, t, ranks_per_node), home, ranks_per_node)
    return out


def shadow_fractions(cost, P: PlacementProblem, owners: Sequence[int], shares, ranks_per_node: int) -> np.ndarray:
    """``F[L, E, R]`` of FasterMoE-style dynamic shadowing: per layer, the ``s`` most loaded experts of the
    step itself shadowed on every rank (their pairs then stay home), ``s`` the count the cost model says is
    fastest (0: plain expert parallelism); priced by ``cost`` (its ``ahead_window`` zero: the broadcast
    follows the gate)."""
    shares = np.asarray(shares, dtype=float)
    home = shares / shares.sum()
    owned = owned_counts(owners, cost.R)
    base = dispatch_fractions([[int(o)] for o in owners], home, ranks_per_node)
    out = np.zeros((cost.L, cost.E, cost.R))
    for l in range(cost.L):
        out[l] = base
        best = (layer_time(cost, P, l, out, owned, shares), base.copy())
        for e in np.argsort(-P.loads[l], kind="stable"):
            out[l, e] = home  # shadowed everywhere: every rank computes its own pairs
            t = layer_time(cost, P, l, out, owned, shares)
            if t < best[0] * (1 - 1e-12):
                best = (t, out[l].copy())
        out[l] = best[1]
    return out

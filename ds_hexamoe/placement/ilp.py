"""MoETuner's placement ILP: binary placement of replica units, min-max rank time with every layer's
dispatch and combine traffic (linear in the placement: see :mod:`.problem`), HiGHS through ``scipy.optimize.milp``; EPLB's packing bounds it and greedy
is the fallback (docs/design.md, "Heterogeneous placement").
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .problem import PlacementProblem, SolverResult, objective
from .solvers import _units, eplb, greedy, register_solver


class _Rows:
    """A sparse constraint matrix built a block of rows at a time (numpy, no per-entry Python)."""

    def __init__(self):
        self.r, self.c, self.v, self.lo, self.hi, self.n = [], [], [], [], [], 0

    def add(self, k: int, rows, cols, vals, lb, ub) -> None:
        """``k`` rows; entry ``i`` is ``(rows[i], cols[i], vals[i])`` with ``rows`` local to the block."""
        rows, cols = np.asarray(rows, dtype=np.int64).ravel(), np.asarray(cols, dtype=np.int64).ravel()
        self.r.append(rows + self.n)
        self.c.append(cols)
        self.v.append(np.broadcast_to(np.asarray(vals, dtype=float), rows.shape).ravel())
        self.lo.append(np.broadcast_to(np.asarray(lb, dtype=float), (k,)))
        self.hi.append(np.broadcast_to(np.asarray(ub, dtype=float), (k,)))
        self.n += k

    def matrix(self, nv: int):
        from scipy.sparse import coo_matrix

        A = coo_matrix((np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
                       shape=(self.n, nv)).tocsr()
        return A, np.concatenate(self.lo), np.concatenate(self.hi)


def _ilp_window(P: PlacementProblem, n: list[np.ndarray], l0: int, l1: int, F_fixed: np.ndarray,
                upper: float | None, time_limit: float) -> tuple[np.ndarray | None, str]:
    """Solve layers ``[l0, l1]`` with layers ``< l0`` fixed in ``F_fixed``; returns (F or None, status)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    A, lo, hi, nv, nx, oT, ox, ue = _ilp_matrix(P, n, l0, l1, F_fixed)
    nT = l1 - l0 + 1
    cvec = np.zeros(nv)
    cvec[oT:oT + nT] = 1.0
    integrality = np.zeros(nv)
    integrality[:nx] = 1
    ub = np.full(nv, np.inf)
    ub[:nx] = 1.0
    cons = [LinearConstraint(A, lo, hi)]
    if upper is not None:  # a heuristic's objective bounds the sum of the layer times
        cons.append(LinearConstraint(cvec[None, :], -np.inf, upper))
    res = milp(cvec, integrality=integrality, bounds=Bounds(np.zeros(nv), ub), constraints=cons,
               options={"time_limit": max(0.05, time_limit), "mip_rel_gap": P.mip_rel_gap, "disp": False})
    if res.x is None:
        return None, f"no solution ({res.message})"
    R = P.shape[2]
    F = F_fixed.copy()
    for l in range(l0, l1 + 1):
        U = len(ue[l])
        x = res.x[ox[l]:ox[l] + U * R].reshape(U, R) > 0.5
        F[l] = 0.0
        np.add.at(F[l], (np.repeat(ue[l], R).reshape(U, R)[x], np.nonzero(x)[1]), 1.0 / n[l][ue[l]][np.nonzero(x)[0]])
    status = "optimal" if res.status == 0 else f"feasible ({res.message})"
    return F, status


def _ilp_matrix(P: PlacementProblem, n: list[np.ndarray], l0: int, l1: int, F_fixed: np.ndarray):
    """The MILP of layers ``[l0, l1]``: ``x[l, u, r]`` (unit ``u`` of layer ``l`` hosted on rank ``r``,
    binary), per-layer materialization left exposed ``m``, and per layer the slowest rank's time ``T_l``
    (the runtime synchronizes every layer; ``sum_l T_l`` is minimized). Tokens go home -> expert -> home at
    every layer, so a rank's traffic is linear in ``x``: no product terms."""
    L, E, R = P.shape
    W = list(range(l0, l1 + 1))
    ue = {l: np.repeat(np.arange(E), n[l]) for l in W}  # unit -> expert
    U = {l: len(ue[l]) for l in W}
    w = {l: P.loads[l][ue[l]] / n[l][ue[l]] for l in W}  # pairs per unit
    nv = 0
    ox = {}
    for l in W:
        ox[l], nv = nv, nv + U[l] * R
    nx = nv
    om, nv = nv, nv + len(W) * R
    oT, nv = nv, nv + len(W)  # T_l: the slowest rank's time in layer l
    rows = _Rows()
    ranks = np.arange(R)
    for l in W:
        k = U[l] * R
        cols = ox[l] + np.arange(k)  # x[l, u, r] in (u, r) order
        u_of, r_of = np.arange(k) // R, np.arange(k) % R
        rows.add(U[l], u_of, cols, 1.0, 1.0, 1.0)  # every unit on exactly one rank
        rows.add(R, r_of, cols, 1.0, -np.inf, np.minimum(P.slots, E).astype(float))  # memory slots
        # materialization beyond what hides under the overlap window is the exposed m[l, r]
        mcol = om + (l - l0) * R + ranks
        rows.add(R, np.concatenate([r_of, ranks]), np.concatenate([cols, mcol]),
                 np.concatenate([np.tile(P.host_cost, U[l]), -np.ones(R)]), -np.inf, P.overlap.astype(float))
        multi = np.flatnonzero(n[l] > 1)  # replicas of one expert on distinct ranks
        if len(multi):
            idx = np.full(E, -1)
            idx[multi] = np.arange(len(multi))
            sel = idx[ue[l]][u_of] >= 0
            rows.add(len(multi) * R, (idx[ue[l]][u_of] * R + r_of)[sel], cols[sel], 1.0, -np.inf, 1.0)
    # per layer, rank time rows: base_r / L + const_r + sum coef x + m - T_l <= 0 (the step is sum_l T_l)
    hc = np.asarray(P.hop_cost, dtype=float)
    home = np.asarray(P.home, dtype=float)
    for l in W:
        # dispatch and combine: 2 (home_r (total - local_r) + (1 - home_r) local_r) pairs cross r's link
        coef = np.outer(P.pair_cost, w[l]) + 2.0 * (hc * (1 - 2 * home))[:, None] * w[l][None, :]  # [R, U]
        const = P.base / L + 2.0 * hc * home * P.loads[l].sum()
        uu = np.arange(U[l])
        rr = [np.repeat(ranks, U[l]), ranks, ranks]
        cc = [ox[l] + uu[None, :] * R + ranks[:, None], om + (l - l0) * R + ranks, np.full(R, oT + l - l0)]
        vv = [coef, np.ones(R), -np.ones(R)]
        rows.add(R, np.concatenate([np.ravel(x) for x in rr]), np.concatenate([np.ravel(x) for x in cc]),
                 np.concatenate([np.ravel(x) for x in vv]), -np.inf, -const)
    A, lo, hi = rows.matrix(nv)
    return A, lo, hi, nv, nx, oT, ox, ue


def solve_ilp(P: PlacementProblem, upper: float | None = None, joint: bool | None = None) -> SolverResult:
    """The MILP alone (no fallback): joint over all layers when small, else layer by layer (layers share
    no cost term, so the layer-by-layer optimum is the joint one when each layer is solved to optimality)."""
    L, E, R = P.shape
    n = _units(P)
    binaries = sum(int(x.sum()) for x in n) * R
    if joint is None:
        joint = binaries <= P.joint_max_binaries
    F0 = np.zeros((L, E, R))
    t0 = time.perf_counter()
    if joint:
        F, status = _ilp_window(P, n, 0, L - 1, F0, upper, P.time_limit)
        if F is None:
            return SolverResult(F0, float("inf"), status, 0.0, {"joint": True})
        return SolverResult(F, objective(P, F), status, 0.0, {"joint": True, "binaries": binaries})
    # layer by layer; a layer HiGHS cannot solve in its share of the time keeps EPLB's packing
    fallback = eplb(P).F
    F, statuses = F0, []
    for l in range(L):
        left = P.time_limit - (time.perf_counter() - t0)
        if left <= 0.05:  # out of time: the remaining layers keep EPLB's packing without building their MILP
            Fl, st = None, "no solution (time limit reached before this layer)"
        else:
            Fl, st = _ilp_window(P, n, l, l, F, None, 0.9 * left / (L - l))  # HiGHS overshoots its limit a little
        statuses.append(st)
        if Fl is None:
            Fl = F.copy()
            Fl[l] = fallback[l]
        F = Fl
    solved = sum(s == "optimal" for s in statuses)
    failed = sum(s.startswith("no solution") for s in statuses)
    status = f"layerwise: {solved}/{L} optimal" + (f", {failed} kept EPLB's packing" if failed else "")
    return SolverResult(F, objective(P, F), status, 0.0, {"joint": False, "binaries": binaries})


@register_solver("ilp")
def ilp(P: PlacementProblem) -> SolverResult:
    """MoETuner's ILP over whole experts; EPLB's packing (a feasible point of the same ILP) bounds the
    objective. Greedy's result is returned instead when it is better (it splits experts into token
    fractions, which no whole-expert placement reaches) or when HiGHS finds nothing in the time limit; the
    ILP's own objective stays in ``meta``."""
    t0 = time.perf_counter()
    g = greedy(P)
    e = eplb(P)
    # the time limit covers the whole solver: what the heuristics used is gone
    P = replace(P, time_limit=max(0.05, P.time_limit - (time.perf_counter() - t0)))
    L, E, R = P.shape
    joint = sum(int(x.sum()) for x in _units(P)) * R <= P.joint_max_binaries
    # scipy's milp takes no warm start: EPLB's objective bounds T instead (prunes the search). Never
    # greedy's: a fractional bound can leave no whole-expert point, and HiGHS then reports "infeasible"
    upper = e.objective * (1 + 1e-9) + 1e-15 if joint else None
    r = solve_ilp(P, upper=upper, joint=joint)
    meta = {"ilp_objective": r.objective, "greedy_objective": g.objective, "eplb_objective": e.objective}
    if r.objective <= g.objective * (1 + 1e-9):
        r.meta.update(meta)
        return r
    why = (f"greedy's fractional split beats the ILP's whole experts ({g.objective:.4g} < {r.objective:.4g})"
           if np.isfinite(r.objective) else f"fallback to greedy (ilp: {r.status})")
    return SolverResult(g.F, g.objective, why, 0.0, {**meta, **r.meta})

"""MoETuner's placement ILP: binary placement of replica units, min-max rank time with exactly
linearized affinity traffic, HiGHS through ``scipy.optimize.milp``; EPLB's packing bounds it and greedy
is the fallback (docs/design.md, "Heterogeneous placement").
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .problem import PlacementProblem, SolverResult, objective, rank_times
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
    cvec = np.zeros(nv)
    cvec[oT] = 1.0
    integrality = np.zeros(nv)
    integrality[:nx] = 1
    ub = np.full(nv, np.inf)
    ub[:nx] = 1.0
    if upper is not None:
        ub[oT] = upper
    res = milp(cvec, integrality=integrality, bounds=Bounds(np.zeros(nv), ub), constraints=LinearConstraint(A, lo, hi),
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
    binary), the linearized affinity traffic ``z``/``y``, per-layer materialization left exposed ``m``,
    and the step time ``T`` (minimized)."""
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
    oz, oy = {}, {}
    for l in W[:-1]:
        oz[l], nv = nv, nv + U[l] * R
        oy[l + 1], nv = nv, nv + U[l + 1] * R
    om, nv = nv, nv + len(W) * R
    oT, nv = nv, nv + 1
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
    for l in W[:-1]:
        _affinity_rows(rows, P.hops[l], n[l], n[l + 1], ue[l], ue[l + 1], (ox[l], ox[l + 1], oz[l], oy[l + 1]), R)
    # rank time rows: const_r + sum coef x + m + hop_cost (z + y) - T <= 0
    const = rank_times(P, F_fixed, upto=l0) if l0 > 0 else P.base.astype(float).copy()
    hc = np.asarray(P.hop_cost, dtype=float)
    home = np.asarray(P.home, dtype=float)
    r_list, c_list, v_list = [], [], []
    for l in W:
        coef = np.outer(P.pair_cost, w[l])  # [R, U]
        for edge in [e for e in (0, L - 1) if e == l]:  # tokens leave home for the first layer, return after the last
            coef = coef + (hc * (1 - 2 * home))[:, None] * w[l][None, :]
            const = const + hc * home * P.loads[edge].sum()
        if l == l0 and l0 > 0:  # hops from the fixed previous layer: linear in this layer's x
            Mp, Fp = P.hops[l0 - 1], F_fixed[l0 - 1]
            const = const + hc * (Fp.T @ Mp.sum(axis=1))
            per_e = (Mp.sum(axis=0)[None, :] - 2.0 * (Fp.T @ Mp)) / n[l][None, :]
            coef = coef + hc[:, None] * per_e[:, ue[l]]
        uu = np.arange(U[l])
        r_list.append(np.repeat(ranks, U[l]))
        c_list.append(ox[l] + uu[None, :] * R + ranks[:, None])
        v_list.append(coef)
        r_list.append(ranks)
        c_list.append(om + (l - l0) * R + ranks)
        v_list.append(np.ones(R))
    for l in W[:-1]:
        for off, Uc in ((oz[l], U[l]), (oy[l + 1], U[l + 1])):
            r_list.append(np.repeat(ranks, Uc))
            c_list.append(off + np.arange(Uc)[None, :] * R + ranks[:, None])
            v_list.append(np.repeat(hc, Uc))
    r_list.append(ranks)
    c_list.append(np.full(R, oT))
    v_list.append(-np.ones(R))
    rows.add(R, np.concatenate([np.ravel(x) for x in r_list]), np.concatenate([np.ravel(x) for x in c_list]),
             np.concatenate([np.ravel(x) for x in v_list]), -np.inf, -const)
    A, lo, hi = rows.matrix(nv)
    return A, lo, hi, nv, nx, oT, ox, ue


def _affinity_rows(rows: _Rows, M: np.ndarray, na: np.ndarray, nb: np.ndarray, ua: np.ndarray, ub: np.ndarray,
                   offsets: tuple[int, int, int, int], R: int) -> None:
    """The affinity traffic between consecutive layers ``a`` and ``b`` (pairs ``M``), exactly linearized for
    binary x: ``z`` (out of ``a``'s units) and ``y`` (into ``b``'s) bound each rank's crossing pairs."""
    xa, xb, oz, oy = offsets
    flow = M[np.ix_(ua, ub)] / np.outer(na[ua], nb[ub])
    S_out, S_in = flow.sum(axis=1), flow.sum(axis=0)
    iu, iv = np.nonzero(flow)
    fv = flow[iu, iv]
    ranks = np.arange(R)
    for Ua, oa, ob, oaux, S, a_idx, b_idx in ((len(ua), xa, xb, oz, S_out, iu, iv),
                                                (len(ub), xb, xa, oy, S_in, iv, iu)):
        # row (r, a): S[a] x[a, r] - aux[a, r] - sum_b flow x[b, r] <= 0
        ra = np.arange(R * Ua)
        r_, a_ = ra // Ua, ra % Ua
        rr = np.repeat(ranks, len(a_idx))
        rows.add(R * Ua,
                 np.concatenate([ra, ra, rr * Ua + np.tile(a_idx, R)]),
                 np.concatenate([oa + a_ * R + r_, oaux + a_ * R + r_, ob + np.tile(b_idx, R) * R + rr]),
                 np.concatenate([S[a_], -np.ones(R * Ua), -np.tile(fv, R)]), -np.inf, 0.0)


def solve_ilp(P: PlacementProblem, upper: float | None = None, joint: bool | None = None) -> SolverResult:
    """The MILP alone (no fallback): joint over all layers when small, else layer by layer, each layer
    given the previous layers' placement (its hops from them are then linear)."""
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
    """MoETuner's ILP; EPLB's packing (a feasible point of the same ILP) bounds the objective, and the
    greedy result is returned when HiGHS finds nothing better within the time limit."""
    t0 = time.perf_counter()
    g = greedy(P)
    e = eplb(P)
    # the time limit covers the whole solver: what the heuristics used is gone
    P = replace(P, time_limit=max(0.05, P.time_limit - (time.perf_counter() - t0)))
    L, E, R = P.shape
    joint = sum(int(x.sum()) for x in _units(P)) * R <= P.joint_max_binaries
    # scipy's milp takes no warm start: the best heuristic bounds T instead (prunes the search)
    upper = min(e.objective, g.objective) * (1 + 1e-9) + 1e-15 if joint else None
    r = solve_ilp(P, upper=upper, joint=joint)
    if r.objective < g.objective * (1 - 1e-9):
        r.meta.update(greedy_objective=g.objective, eplb_objective=e.objective)
        return r
    return SolverResult(g.F, g.objective, f"fallback to greedy (ilp: {r.status})", 0.0,
                        {"ilp_objective": r.objective, "eplb_objective": e.objective, **r.meta})

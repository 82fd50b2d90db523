"""Expert placement solvers behind one interface (a registry, MegaBlocks-style).

A :class:`PlacementProblem` holds, for a run of consecutive expert-parallel MoE layers, the per-step
expert loads, the cross-layer token hops (affinity), and per-rank costs. A solution is a fraction
matrix ``F[l, e, r]`` (the share of expert ``e``'s tokens in layer ``l`` that rank ``r`` computes;
``F > 0`` means ``r`` hosts a replica). Every solver is scored by the same :func:`rank_times`:

``time_r = base_r + compute_r + materialize_r + hop_cost_r * hops_r``

- compute: ``pair_cost_r * sum_{l,e} load[l,e] F[l,e,r]``;
- materialize: per layer ``max(0, host_cost_r * hosted[l,r] - overlap_r)`` (replicas built from FSSDP
  shards, hidden under the layer's dense compute up to ``overlap_r``);
- hops: tokens dispatched from their home ranks (share ``home_r``) into the first layer, handed from the
  rank of their expert in layer ``l`` to that in ``l+1`` (MoETuner's affinity traffic: a token whose
  consecutive experts are on different ranks crosses the link; counted on the sender and the
  receiver), and combined back home after the last layer.

Solvers: ``greedy`` (HeterMoE Asym-EA: fill ranks with load in proportion to speed, splitting experts
into fractions), ``eplb`` (DeepSeek EPLB: replicate the heaviest experts, pack replicas onto the rank
that finishes first) and ``ilp`` (MoETuner: binary placement of replica units, min-max rank time with
exact linearized affinity traffic, HiGHS through ``scipy.optimize.milp``; greedy is the fallback).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..config import ConfigError

EPS = 1e-12


@dataclass
class PlacementProblem:
    """Inputs of a placement solve over ``L`` consecutive expert-parallel layers and ``R`` ranks."""

    loads: np.ndarray  # [L, E] (token, expert) pairs per step
    hops: list[np.ndarray]  # L-1 matrices [E, E]: pairs per step going from expert i (l) to j (l+1)
    home: np.ndarray  # [R] fraction of the tokens whose home (attention) is rank r
    pair_cost: np.ndarray  # [R] seconds per pair (fwd + bwd)
    hop_cost: np.ndarray  # [R] seconds per pair crossing the rank's link (fwd + bwd)
    host_cost: np.ndarray  # [R] seconds to materialize one hosted expert replica per layer
    overlap: np.ndarray  # [R] seconds per layer that materialization can hide under
    base: np.ndarray  # [R] fixed seconds (dense part)
    slots: np.ndarray  # [R] experts a rank can host per layer (memory)
    replicas: int | None = None  # extra replica units per layer for eplb/ilp; None: max(0, R - E)
    time_limit: float = 10.0
    mip_rel_gap: float = 1e-6
    joint_max_binaries: int = 4000  # larger ILPs are solved layer by layer

    @property
    def shape(self) -> tuple[int, int, int]:
        L, E = self.loads.shape
        return L, E, len(self.pair_cost)

    def check(self) -> None:
        """Raise before any work when no placement can satisfy memory."""
        L, E, R = self.shape
        if self.slots.max() < 1:
            raise ConfigError("placement: no rank has memory for even one expert replica (slots are all 0); "
                              "reduce the batch, enable rematerialization, or add memory")
        if int(np.minimum(self.slots, E).sum()) < E:
            raise ConfigError(f"placement: ranks can host {int(self.slots.sum())} experts per layer in all, fewer than "
                              f"the {E} experts of a layer; total memory is too small for this model and batch")

    def n_units(self) -> int:
        L, E, R = self.shape
        cap = int(np.minimum(self.slots, E).sum()) - E
        extra = max(0, R - E) if self.replicas is None else self.replicas
        return E + max(0, min(extra, cap, E * (R - 1)))


@dataclass
class SolverResult:
    F: np.ndarray  # [L, E, R]
    objective: float  # max_r rank_times
    status: str
    wall_s: float
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ objective
def rank_times(P: PlacementProblem, F: np.ndarray, upto: int | None = None) -> np.ndarray:
    """Per-rank seconds of the layers ``[0, upto)`` (all by default) under fractions ``F``.

    With ``upto < L`` the hops into layer ``upto`` and the final combine are left out (the sequential
    ILP adds them as terms of the next window).
    """
    L, E, R = P.shape
    n = L if upto is None else upto
    t = P.base.astype(float).copy()
    if n == 0:
        return t
    Fn = F[:n]
    t += P.pair_cost * np.einsum("le,ler->r", P.loads[:n], Fn)
    hosted = (Fn > EPS).sum(axis=1)  # [n, R]
    t += np.maximum(0.0, hosted * P.host_cost[None, :] - P.overlap[None, :]).sum(axis=0)
    hops = _home_hops(P, F, 0)
    if n == L:
        hops = hops + _home_hops(P, F, L - 1)
    for l in range(n - 1):
        hops = hops + _pair_hops(P.hops[l], F[l], F[l + 1])
    return t + P.hop_cost * hops


def _home_hops(P: PlacementProblem, F: np.ndarray, l: int) -> np.ndarray:
    """Pairs sent plus received per rank when tokens move between home ranks and layer ``l``'s experts."""
    local = P.loads[l] @ F[l]  # [R] pairs computed on r
    total = P.loads[l].sum()
    return P.home * (total - local) + (1.0 - P.home) * local


def _pair_hops(M: np.ndarray, Fa: np.ndarray, Fb: np.ndarray) -> np.ndarray:
    """``sum_ij M_ij [Fa_ir (1 - Fb_jr) + Fb_jr (1 - Fa_ir)]``: out- plus in-traffic of each rank."""
    out = Fa.T @ M.sum(axis=1)
    inn = Fb.T @ M.sum(axis=0)
    cross = ((M @ Fb) * Fa).sum(axis=0)  # sum_ij Fa_ir M_ij Fb_jr, through BLAS
    return out + inn - 2.0 * cross


def objective(P: PlacementProblem, F: np.ndarray) -> float:
    return float(rank_times(P, F).max())


def check_solution(P: PlacementProblem, F: np.ndarray, tol: float = 1e-6) -> None:
    """Raise if ``F`` does not place every expert fully or exceeds a rank's slots."""
    L, E, R = P.shape
    if F.shape != (L, E, R):
        raise ValueError(f"placement: F has shape {F.shape}; expected {(L, E, R)}")
    if np.abs(F.sum(axis=2) - 1.0).max() > tol or F.min() < -tol:
        raise ValueError("placement: every expert's fractions must be >= 0 and sum to 1")
    hosted = (F > EPS).sum(axis=1)
    over = np.argwhere(hosted > P.slots[None, :])
    if len(over):
        l, r = over[0]
        raise ValueError(f"placement: layer {l} hosts {hosted[l, r]} experts on rank {r}; its memory allows {P.slots[r]}")


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
def greedy(P: PlacementProblem, min_fraction: float = 0.02) -> SolverResult:
    """Asymmetric expert assignment: per layer, water-fill rank capacity by speed, then fill the heaviest
    experts into the roomiest ranks, splitting an expert when a rank's room runs out (fragments under
    ``min_fraction`` of the expert stay whole). Ignores affinity."""
    L, E, R = P.shape
    F = np.zeros((L, E, R))
    cur = P.base.astype(float).copy()
    # hosting a piece costs its materialization beyond what dense compute hides: a piece smaller than
    # the pairs that time could compute is not worth splitting off
    fixed = np.maximum(0.0, P.host_cost - P.overlap)
    worth = fixed / P.pair_cost
    for l in range(L):
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
        cur += assigned * P.pair_cost
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
    cur = P.base.astype(float).copy()
    for l, n in enumerate(_units(P)):
        units = sorted(((P.loads[l, e] / n[e], e) for e in range(E) for _ in range(n[e])), key=lambda t: -t[0])
        slots = np.minimum(P.slots, E).astype(int).copy()
        for w, e in units:
            cand = [r for r in range(R) if slots[r] > 0 and F[l, e, r] == 0]
            if not cand:
                raise ConfigError(f"placement: layer {l}, expert {e} finds no rank with a free slot; "
                                  "total memory is too small for this model and batch")
            r = min(cand, key=lambda r: (cur[r] + w * P.pair_cost[r], -slots[r]))
            F[l, e, r] = 1.0 / n[e]
            cur[r] += w * P.pair_cost[r]
            slots[r] -= 1
    return SolverResult(F, objective(P, F), "ok", 0.0, {"replicas": [int(n.sum()) - E for n in _units(P)]})


# ------------------------------------------------------------------------------------------------ ilp
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
    # affinity traffic inside the window, exactly linearized for binary x
    for l in W[:-1]:
        M = P.hops[l]
        flow = M[np.ix_(ue[l], ue[l + 1])] / np.outer(n[l][ue[l]], n[l + 1][ue[l + 1]])
        S_out, S_in = flow.sum(axis=1), flow.sum(axis=0)
        iu, iv = np.nonzero(flow)
        fv = flow[iu, iv]
        for Ua, oa, ob, oaux, S, a_idx, b_idx in ((U[l], ox[l], ox[l + 1], oz[l], S_out, iu, iv),
                                                    (U[l + 1], ox[l + 1], ox[l], oy[l + 1], S_in, iv, iu)):
            # row (r, a): S[a] x[a, r] - aux[a, r] - sum_b flow x[b, r] <= 0
            ra = np.arange(R * Ua)
            r_, a_ = ra // Ua, ra % Ua
            rr = np.repeat(ranks, len(a_idx))
            rows.add(R * Ua,
                     np.concatenate([ra, ra, rr * Ua + np.tile(a_idx, R)]),
                     np.concatenate([oa + a_ * R + r_, oaux + a_ * R + r_, ob + np.tile(b_idx, R) * R + rr]),
                     np.concatenate([S[a_], -np.ones(R * Ua), -np.tile(fv, R)]), -np.inf, 0.0)
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

"""The expert placement problem and the one objective every solver is scored by.

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
  receiver), and combined back home after the last layer (docs/design.md, "Heterogeneous placement").
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

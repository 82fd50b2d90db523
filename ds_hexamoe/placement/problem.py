"""The expert placement problem and the one objective every solver is scored by.

A :class:`PlacementProblem` holds, for a run of consecutive expert-parallel MoE layers, the per-step
expert loads, the cross-layer flows (affinity: recorded, not costed), and per-rank costs. A solution is a fraction
matrix ``F[l, e, r]`` (the share of expert ``e``'s tokens in layer ``l`` that rank ``r`` computes;
``F > 0`` means ``r`` hosts a replica). Every solver is scored by the same :func:`rank_times`:

``time_r = base_r + compute_r + materialize_r + hop_cost_r * hops_r``, a sum of per-layer times
(:func:`layer_times`, the dense base spread evenly over the layers). The runtime synchronizes the ranks at
every layer's dispatch and combine, so the objective is ``sum_l max_r time[l, r]`` (:func:`objective`).

- compute: ``pair_cost_r * sum_{l,e} load[l,e] F[l,e,r]``;
- materialize: per layer ``max(0, host_cost_r * hosted[l,r] - overlap_r)`` (replicas built from FSSDP
  shards, hidden under the layer's dense compute up to ``overlap_r``);
- hops: at every layer, tokens go from their home ranks (share ``home_r``: where their attention runs)
  to the ranks computing their experts and back (dispatch and combine, forward and backward), counted on
  the sender and the receiver. This is what the runtime does (``parallel/expert_parallel.py``): the next
  layer's attention needs the token at home, so two consecutive experts on one rank save nothing and
  cross-layer affinity enters no cost here (docs/placement.md, "Cost model").
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
    hops: list[np.ndarray]  # L-1 matrices [E, E]: pairs per step from expert i (l) to j (l+1); not costed
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
    objective: float  # sum over layers of the slowest rank's layer time
    status: str
    wall_s: float
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ objective
def rank_times(P: PlacementProblem, F: np.ndarray, upto: int | None = None) -> np.ndarray:
    """Per-rank seconds of the layers ``[0, upto)`` (all by default) under fractions ``F``."""
    L, E, R = P.shape
    n = L if upto is None else upto
    t = P.base.astype(float).copy()
    if n == 0:
        return t
    Fn = F[:n]
    t += P.pair_cost * np.einsum("le,ler->r", P.loads[:n], Fn)
    hosted = (Fn > EPS).sum(axis=1)  # [n, R]
    t += np.maximum(0.0, hosted * P.host_cost[None, :] - P.overlap[None, :]).sum(axis=0)
    hops = sum(layer_hops(P, F, l) for l in range(n))
    return t + P.hop_cost * hops


def _home_hops(P: PlacementProblem, F: np.ndarray, l: int) -> np.ndarray:
    """Pairs sent plus received per rank when tokens move between home ranks and layer ``l``'s experts."""
    local = P.loads[l] @ F[l]  # [R] pairs computed on r
    total = P.loads[l].sum()
    return P.home * (total - local) + (1.0 - P.home) * local


def layer_hops(P: PlacementProblem, F: np.ndarray, l: int) -> np.ndarray:
    """Pairs crossing each rank's link in layer ``l``: dispatch home -> expert plus combine back."""
    return 2.0 * _home_hops(P, F, l)


def layer_times(P: PlacementProblem, F: np.ndarray) -> np.ndarray:
    """``[L, R]`` seconds per layer and rank (their sum over layers is :func:`rank_times`): a rank's time in
    layer ``l`` depends only on its own pairs and hosted experts there."""
    L = P.shape[0]
    out = np.empty((L, P.shape[2]))
    for l in range(L):
        local = P.loads[l] @ F[l]
        hosted = (F[l] > EPS).sum(axis=0)
        out[l] = (P.base / L + P.pair_cost * local + np.maximum(0.0, hosted * P.host_cost - P.overlap)
                  + P.hop_cost * layer_hops(P, F, l))
    return out


def objective(P: PlacementProblem, F: np.ndarray) -> float:
    """The step the runtime takes: it synchronizes at every layer's dispatch and combine, so the sum over
    layers of the slowest rank's layer time (never less than the busiest rank's sum)."""
    return float(layer_times(P, F).max(axis=1).sum())


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

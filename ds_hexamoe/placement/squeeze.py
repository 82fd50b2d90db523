"""``bubble_squeeze``: a colocated expert-parallel heuristic that places whole experts per layer into the
ranks' accumulated bubbles. It borrows the words of HeterMoE's Asym-EA (gather, squeeze) but not its
execution model: every rank attends here, there is no attention/expert split and no zebra pipeline
(HeterMoE's own Asym-EA, for zebra, is :mod:`.asym_ea`). Until 2026-12-06 it was the ``asym_ea`` solver.

The runtime synchronizes at every expert-parallel layer's dispatch and combine, so what a rank does not
use of a layer (the time it waits for that layer's slowest rank) is a bubble, and bubbles add up over
the layers. The heuristic works on that per-layer time, not on per-rank sums:

- **gather**: per layer, whole experts (heaviest first) go to the rank that would finish the layer's
  *expert work* first, within its memory slots: experts gather on the ranks fastest at experts, blind to
  the dense (attention) work each rank also has, which leaves bubbles on the ranks that finish early;
- **squeeze**: the bubbles of every rank are accumulated over the layers; the rank with the most idle
  time takes whole experts back from the slowest rank of the layers where it waits longest, at most as
  many per round as its memory has free slots (memory-bounded chunks), as long as a move shortens that
  layer; rounds repeat until no move helps.

The unit moved is a whole expert, or with replication (``PlacementProblem.replicas``, as for ``eplb``
and ``ilp``: by default enough for every rank to host one) a whole replica of one, carrying an equal
share of the expert's tokens, replicas of one expert on distinct ranks; ``replicas=0`` is the published
whole-expert form. A rank's time in layer ``l`` is :func:`~.problem.layer_times` (its share of the dense
base, compute of its experts' pairs, materialization not hidden, dispatch and combine traffic); it depends
only on the rank's own pairs and hosted experts, so a move changes two ranks and is scored exactly.
"""
from __future__ import annotations

import numpy as np

from .problem import PlacementProblem, SolverResult, layer_times, objective
from .solvers import _units, register_solver


def _rank_layer_time(P: PlacementProblem, l: int, local: np.ndarray, hosted: np.ndarray,
                     dense: bool = True) -> np.ndarray:
    """Seconds per rank in layer ``l`` with ``local[r]`` pairs and ``hosted[r]`` experts on rank ``r``
    (``dense=False``: the expert work only)."""
    L = P.shape[0] if dense else np.inf
    total = float(P.loads[l].sum())
    hops = 2.0 * (P.home * (total - local) + (1.0 - P.home) * local)
    mat = np.maximum(0.0, hosted * P.host_cost - P.overlap)
    return P.base / L + P.pair_cost * local + mat + P.hop_cost * hops


def synchronized_time(P: PlacementProblem, F: np.ndarray) -> float:
    """Sum over layers of the slowest rank's layer time: the step when every layer synchronizes."""
    return objective(P, F)


class _Layer:
    """One layer's units (expert id, pairs) and where they are."""

    def __init__(self, P: PlacementProblem, l: int, n: np.ndarray):
        self.l = l
        self.expert = np.repeat(np.arange(len(n)), n)
        self.load = P.loads[l][self.expert] / n[self.expert]
        self.owner = np.full(len(self.expert), -1)

    def state(self, R: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.bincount(self.owner, weights=self.load, minlength=R),
                np.bincount(self.owner, minlength=R).astype(float))

    def fractions(self, E: int, R: int, n: np.ndarray) -> np.ndarray:
        F = np.zeros((E, R))
        np.add.at(F, (self.expert, self.owner), 1.0 / n[self.expert])
        return F


def _gather(P: PlacementProblem, x: _Layer, slots: np.ndarray) -> None:
    R = P.shape[2]
    local, hosted = np.zeros(R), np.zeros(R)
    for u in np.argsort(-x.load, kind="stable"):
        # a rank's time depends only on its own load: every rank's time with u added, at once
        t = _rank_layer_time(P, x.l, local + x.load[u], hosted + 1, dense=False)
        t[hosted >= slots] = np.inf
        placed = x.owner[x.expert == x.expert[u]]
        t[placed[placed >= 0]] = np.inf  # replicas of one expert on distinct ranks
        best = int(np.argmin(t))
        x.owner[u] = best
        local[best] += x.load[u]
        hosted[best] += 1


def _time_of(P: PlacementProblem, l: int, r: int, local: np.ndarray, hosted: np.ndarray) -> np.ndarray:
    """Rank ``r``'s layer time for each candidate ``(local, hosted)``."""
    total = float(P.loads[l].sum())
    hops = 2.0 * (P.home[r] * (total - local) + (1.0 - P.home[r]) * local)
    mat = np.maximum(0.0, hosted * P.host_cost[r] - P.overlap[r])
    return P.base[r] / P.shape[0] + P.pair_cost[r] * local + mat + P.hop_cost[r] * hops


def _squeeze_into(P: PlacementProblem, layers: list[_Layer], slots: np.ndarray, r: int, T: np.ndarray) -> int:
    """Move up to a memory-bounded chunk of whole units onto rank ``r``, worst layers first; moves made."""
    R = P.shape[2]
    moves = 0
    for l in np.argsort(-(T.max(axis=1) - T[:, r]), kind="stable"):
        x = layers[l]
        local, hosted = x.state(R)
        chunk = int(slots[r] - hosted[r])  # what rank r's memory still holds in this layer
        while chunk > 0:
            t = _rank_layer_time(P, l, local, hosted)
            c = int(np.argmax(t))
            if c == r:
                break
            here = np.unique(x.expert[x.owner == r])
            cand = np.flatnonzero((x.owner == c) & ~np.isin(x.expert, here))
            if not len(cand):
                break
            w = x.load[cand]
            others = np.delete(t, [c, r]).max(initial=0.0)
            new = np.maximum(others, np.maximum(_time_of(P, l, c, local[c] - w, hosted[c] - 1),
                                                _time_of(P, l, r, local[r] + w, hosted[r] + 1)))
            if new.min() >= t.max() * (1 - 1e-12):
                break
            u = int(cand[int(np.argmin(new))])
            x.owner[u] = r
            local[[c, r]] += (-x.load[u], x.load[u])
            hosted[[c, r]] += (-1, 1)
            chunk -= 1
            moves += 1
        if moves and P.shape[0] > 1:
            return moves  # bubbles changed: re-accumulate before the next chunk
    return moves


@register_solver("bubble_squeeze")
def bubble_squeeze(P: PlacementProblem, max_rounds: int | None = None) -> SolverResult:
    """Gather whole units per layer, then squeeze them into the ranks with the most accumulated bubble."""
    L, E, R = P.shape
    slots = np.minimum(P.slots, E).astype(int)
    n = _units(P)
    layers = [_Layer(P, l, n[l]) for l in range(L)]
    for x in layers:
        _gather(P, x, slots)

    def fractions() -> np.ndarray:
        return np.stack([x.fractions(E, R, n[x.l]) for x in layers])

    rounds = moves = 0
    for rounds in range(1, (4 * L * E if max_rounds is None else max_rounds) + 1):
        T = layer_times(P, fractions())
        bubble = (T.max(axis=1, keepdims=True) - T).sum(axis=0)  # accumulated over the layers
        moved = 0
        for r in np.argsort(-bubble, kind="stable"):
            if bubble[r] <= 0:
                break
            moved = _squeeze_into(P, layers, slots, int(r), T)
            if moved:
                break
        moves += moved
        if not moved:
            break
    F = fractions()
    return SolverResult(F, objective(P, F), "ok", 0.0,
                        {"synchronized_s": synchronized_time(P, F), "rounds": rounds, "moves": moves,
                         "replicas": [int(k.sum()) - E for k in n]})

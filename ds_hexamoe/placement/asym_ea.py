"""HeterMoE's asymmetric expert assignment (Asym-EA, Algorithm 1, "gather-and-squeeze") for the zebra pipeline.

Zebra gives ``M`` attention ranks the dense work and ``N`` expert ranks whole experts. Where the expert ranks
are the slower side of a layer, the attention ranks idle: a bubble ``T_gather = T_experts - T_attention``.
Asym-EA moves whole experts of such layers onto the attention ranks (the runtime, ``parallel/zebra.py``,
computes them there, per layer):

- **gather**: each layer's experts go to the expert ranks, heaviest first onto the rank that finishes them
  first at its expert speed, within memory;
- **squeeze**: walking the layers, the bubble accumulates (``t += T_gather``, never below 0); while ``t``
  covers a chunk's time on the attention ranks (``T_squeeze``), the chunk moves and ``t -= T_squeeze`` (the
  paper's ``floor(t / T_squeeze)`` chunks). A chunk is ``n1 = max(1, N // M)`` experts per attention rank,
  taken round-robin from the expert ranks, most loaded first (``n2 = n1 M / N`` each when ``M`` divides ``N``
  or ``N`` divides ``M``, the paper's condition; otherwise as even as the round-robin makes it). Memory caps
  what a rank holds (the paper's ``n_max``: whole experts over all layers), and an expert rank keeps at least
  one expert per layer (``n_min``).

Routing statistics make experts unequal, which the paper's equal-expert chunks do not meet: each rank gives
its heaviest expert whose time on the attention rank fits the bubble left, so ``T_squeeze`` is the chunk's
real time (its slowest attention rank), and a layer whose lightest candidate does not fit moves nothing.
"""
from __future__ import annotations

import numpy as np


def rank_busy(owner_l: np.ndarray, p_l: np.ndarray, per_rank: np.ndarray) -> np.ndarray:
    """Seconds of one layer's expert work per rank: ``p_l[e]`` (a fraction of the layer's pairs) of expert ``e``
    on its owner, whose whole-layer expert work takes ``per_rank[r]`` seconds."""
    return np.bincount(owner_l, weights=p_l * per_rank[owner_l], minlength=len(per_rank))


def gather(p: np.ndarray, experts: list[int], per_rank: np.ndarray, caps: np.ndarray,
           spill: list[int] = ()) -> np.ndarray | None:
    """``owner [L, E]``: each layer's experts on the expert ranks, heaviest first onto the rank that finishes
    first, within ``caps`` (whole experts over all layers per rank), every expert rank at least one per layer
    (the last experts go to ranks still empty; a slot kept for each later layer); an expert no expert rank has
    room for goes to a ``spill`` rank
    (an attention rank) the same way; None when none has room."""
    L, E = p.shape
    ranks, must = list(experts) + list(spill), len(experts)
    speed, cap = [float(per_rank[r]) for r in ranks], [int(caps[r]) for r in ranks]
    used = [0] * len(ranks)
    owner = np.full((L, E), -1)
    for l in range(L):  # plain Python: a few ranks per expert, where numpy's per-call cost would dominate
        t, count = [0.0] * len(ranks), [0] * len(ranks)
        for left, e in enumerate(np.argsort(-p[l], kind="stable").tolist()):
            empty = [i for i in range(must) if not count[i]]
            # an expert rank keeps a slot for each later layer, so it hosts one in every layer
            room = [i for i in (empty if len(empty) >= E - left else range(must)) if used[i] + L - 1 - l < cap[i]]
            room = room or [i for i in range(must, len(ranks)) if used[i] < cap[i]]  # the expert ranks are full
            if not room:
                return None
            best, i = min((t[i] + p[l, e] * speed[i], i) for i in room)
            owner[l, e], t[i] = ranks[i], best
            used[i] += 1
            count[i] += 1
    return owner


def _chunk(owner_l, p_l, attention, experts, per_rank, room, n1, t) -> list[tuple[int, int]]:
    """Up to ``n1`` experts per attention rank, round-robin from the expert ranks (most loaded first), each the
    giver's heaviest whose time on its receiver fits ``t``; an expert rank keeps one expert."""
    busy = rank_busy(owner_l, p_l, per_rank)
    givers = sorted(experts, key=lambda r: -busy[r])
    left = {r: sorted(np.flatnonzero(owner_l == r), key=lambda e: -p_l[e]) for r in givers}
    added, got, moves = {a: 0.0 for a in attention}, {a: 0 for a in attention}, []
    for i in range(n1 * len(attention)):
        g = givers[i % len(givers)]
        open_ = [a for a in attention if got[a] < n1 and room[a] > got[a]]
        if len(left[g]) <= 1 or not open_:
            continue
        a = min(open_, key=lambda a: added[a] + busy[a])
        fits = [e for e in left[g] if added[a] + p_l[e] * per_rank[a] <= t]
        if fits:
            e = fits[0]
            left[g].remove(e)
            moves.append((int(e), a))
            added[a] += p_l[e] * per_rank[a]
            got[a] += 1
    return moves


def squeeze(owner: np.ndarray, p: np.ndarray, attention: list[int], experts: list[int], t_att: np.ndarray,
            per_rank: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, int]:
    """Algorithm 1's squeeze on a gathered ``owner [L, E]``; ``t_att[a]``: rank ``a``'s attention seconds per
    layer. Returns the new owners and the experts moved."""
    owner = owner.copy()
    used = np.bincount(owner.ravel(), minlength=len(per_rank))
    n1 = max(1, len(experts) // len(attention))
    t, moved = 0.0, 0
    for l in range(owner.shape[0]):
        busy = rank_busy(owner[l], p[l], per_rank)
        t = max(0.0, t + busy[experts].max() - max(t_att[a] + busy[a] for a in attention))
        while True:
            room = {a: int(caps[a] - used[a]) for a in attention}
            moves = _chunk(owner[l], p[l], attention, experts, per_rank, room, n1, t)
            added = {a: sum(p[l, e] * per_rank[a] for e, b in moves if b == a) for a in attention}
            t_squeeze = max(added.values(), default=0.0)
            if not moves or t_squeeze > t:
                break
            for e, a in moves:
                used[owner[l, e]] -= 1
                owner[l, e] = a
                used[a] += 1
            t -= t_squeeze
            moved += len(moves)
    return owner, moved


def fractions(owner: np.ndarray, p: np.ndarray, ranks: int) -> np.ndarray:
    """``[L, R]``: each rank's part of each layer's expert pairs under ``owner``."""
    return np.stack([np.bincount(owner[l], weights=p[l], minlength=ranks) for l in range(len(owner))])

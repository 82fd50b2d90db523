"""Hecate's sparse materialization placement (its Algorithm 1): where each expert of a layer runs in the
next iteration, decided from the layer's load window, for the ``"hecate"`` execution mode.

Every expert runs on its FSSDP owner. On top of that, each rank has ``m`` free slots (the experts its
one-layer cache can hold besides its own: ``E - owned``) and the iteration can hide about ``t`` expert
gathers per rank under the preceding non-MoE compute. With ``t <= m`` the ``t`` most loaded experts of
the window are copied to every rank (hot experts everywhere: their tokens stay local); otherwise each
rank's ``m`` slots are handed out by load, each copy going to a rank on a node that lacks the expert
first. Tokens then go to a local copy, else one on the same node, else any holder, split evenly
(:func:`ds_hexamoe.parallel.replicas.assign_destinations`). Every rank computes the same placement from
the same all-gathered window, so no placement is exchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

from .ownership import LayerOwnership


def window_loads(calls: Sequence[Sequence[Sequence[int]]], num_experts: int) -> list[int]:
    """Tokens per expert over a window of calls (each ``[N][E]``), summed over ranks."""
    return [sum(c[q][e] for c in calls for q in range(len(c))) for e in range(num_experts)]


def hot_count(load: Sequence[int]) -> int:
    """Experts whose window load is above the mean: the default ``t`` when no budget is given."""
    if not load or sum(load) == 0:
        return 0
    mean = sum(load) / len(load)
    return sum(1 for v in load if v > mean)


def hecate_placement(load: Sequence[int], ownership: LayerOwnership, t: int, ranks_per_node: int
                     ) -> dict[int, list[int]]:
    """``{expert: [ranks]}``: owners, plus copies of hot experts by Hecate's rule (module docstring).

    ``load``: tokens per expert in the window; ``t``: expert copies a rank may receive (gathers hidden per
    iteration). Experts without load get no copy."""
    num, world = ownership.num_experts, ownership.world_size
    placement = {e: [ownership.owner(e)] for e in range(num)}
    order = [e for e in sorted(range(num), key=lambda e: (-load[e], e)) if load[e] > 0]
    free = [num - ownership.count(r) for r in range(world)]
    t = max(0, int(t))
    m = min(free) if free else 0
    if t == 0 or not order:
        return placement
    if t <= m:
        for e in order[:t]:
            placement[e] = sorted(range(world))
        return placement
    # slots by load: each pass gives every hot expert one more copy, most loaded first, on the rank with
    # the most free slots among those on nodes without the expert (any rank lacking it otherwise)
    room = [min(f, t) for f in free]
    placed = True
    while placed:
        placed = False
        for e in order:
            holders = placement[e]
            if len(holders) == world:
                continue
            nodes = {r // ranks_per_node for r in holders}
            cand = [r for r in range(world) if r not in holders and room[r] > 0]
            if not cand:
                continue
            fresh = [r for r in cand if r // ranks_per_node not in nodes]
            r = max(fresh or cand, key=lambda q: (room[q], -q))
            holders.append(r)
            holders.sort()
            room[r] -= 1
            placed = True
    return placement


def placement_masks(placement: dict[int, list[int]], world: int, num_experts: int) -> list[list[bool]]:
    """Per rank, the experts the placement puts there (the "active masks" of its materialization)."""
    return [[q in placement[e] for e in range(num_experts)] for q in range(world)]

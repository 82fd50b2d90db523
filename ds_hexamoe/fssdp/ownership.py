"""Whole-expert ownership (Hecate): which rank owns which experts of each MoE layer.

At start each rank owns one contiguous range of expert ids per layer, sized in proportion to its shard
weight (``hexamoe.shard_weights``; even when null). The largest-remainder rounding hands the leftover
experts to different ranks in different layers, so even uneven splits balance over depth. Load-aware
re-ownership (:func:`load_aware_ownership`, Hecate's heterogeneous sharding) keeps each rank's number
of experts but may give it any set of ids: a rank's shard rows are its experts in increasing id order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..apportion import largest_remainder
from ..config import ConfigError


@dataclass(frozen=True)
class LayerOwnership:
    """Experts of one layer per rank: rank ``r`` owns ``experts[r]`` (increasing ids; shard row ``i`` is
    ``experts[r][i]``)."""

    num_experts: int
    experts: tuple[tuple[int, ...], ...]
    _owner: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _row: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        owner, row = [-1] * self.num_experts, [-1] * self.num_experts
        for r, ids in enumerate(self.experts):
            if list(ids) != sorted(set(ids)):
                raise ValueError(f"LayerOwnership: rank {r}'s experts {ids} are not increasing distinct ids")
            for i, e in enumerate(ids):
                if not 0 <= e < self.num_experts or owner[e] != -1:
                    raise ValueError(f"LayerOwnership: expert {e} is out of range or owned twice")
                owner[e], row[e] = r, i
        if -1 in owner:
            raise ValueError(f"LayerOwnership: expert {owner.index(-1)} has no owner")
        object.__setattr__(self, "_owner", tuple(owner))
        object.__setattr__(self, "_row", tuple(row))

    @classmethod
    def from_starts(cls, num_experts: int, starts) -> LayerOwnership:
        """Contiguous ranges: rank ``r`` owns ``starts[r]:starts[r+1]``."""
        return cls(num_experts, tuple(tuple(range(starts[r], starts[r + 1])) for r in range(len(starts) - 1)))

    @property
    def world_size(self) -> int:
        return len(self.experts)

    def count(self, rank: int) -> int:
        return len(self.experts[rank])

    def owned(self, rank: int) -> tuple[int, ...]:
        return self.experts[rank]

    def owner(self, expert: int) -> int:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range [0, {self.num_experts})")
        return self._owner[expert]

    def row(self, expert: int) -> int:
        """The expert's row in its owner's shard."""
        return self._row[expert]

    def owners(self) -> list[int]:
        return list(self._owner)

    @property
    def contiguous(self) -> bool:
        flat = [e for ids in self.experts for e in ids]
        return flat == list(range(self.num_experts))


def normalized_weights(shard_weights: list[float] | None, world_size: int) -> list[float]:
    """Per-rank shard weights summing to 1; raises naming ``hexamoe.shard_weights`` when unusable."""
    if shard_weights is None:
        return [1.0 / world_size] * world_size
    if len(shard_weights) != world_size:
        raise ConfigError(
            f"hexamoe.shard_weights: got {len(shard_weights)} weights {shard_weights!r} for {world_size} ranks; "
            f"give exactly one weight per rank (WORLD_SIZE={world_size}) or null for even shards"
        )
    if not all(math.isfinite(w) and w >= 0 for w in shard_weights) or sum(shard_weights) <= 0:
        raise ConfigError(
            f"hexamoe.shard_weights: got {shard_weights!r}; expected finite numbers >= 0 with a positive sum"
        )
    total = float(sum(shard_weights))
    return [w / total for w in shard_weights]


def split_experts(num_experts: int, weights: list[float], layer: int = 0) -> LayerOwnership:
    """Contiguous expert ranges proportional to ``weights``; the leftover experts go by largest remainder,
    ties rotating with ``layer`` (:func:`ds_hexamoe.apportion.largest_remainder`)."""
    counts = largest_remainder(num_experts, weights, start=layer, what="hexamoe.shard_weights")
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return LayerOwnership.from_starts(num_experts, starts)


def load_aware_ownership(load: list[float], usage: list[list[float]], slots: list[int],
                         ranks_per_node: int) -> LayerOwnership:
    """Hecate's heterogeneous sharding of one layer.

    ``load[e]``: tokens of expert ``e`` over the load window; ``usage[r][e]``: the part rank ``r`` routed;
    ``slots[r]``: experts rank ``r`` keeps (from its shard weight). Experts go in increasing load (the
    least loaded first, the hottest last), each to the node with the least load placed so far among nodes
    with a free slot, preferring the node whose ranks use the expert most (its copies stay intra-node),
    then to that node's least-loaded rank with a free slot (preferring the rank that uses it most)."""
    world, num = len(slots), len(load)
    node = [r // max(1, ranks_per_node) for r in range(world)]
    free, rank_load = list(slots), [0.0] * world
    node_load: dict[int, float] = {n: 0.0 for n in node}
    mine: list[list[int]] = [[] for _ in range(world)]
    for e in sorted(range(num), key=lambda e: (load[e], e)):
        open_nodes = sorted({node[r] for r in range(world) if free[r] > 0})
        used = {n: sum(usage[r][e] for r in range(world) if node[r] == n) for n in open_nodes}
        n = min(open_nodes, key=lambda n: (node_load[n], -used[n], n))
        r = min((r for r in range(world) if node[r] == n and free[r] > 0), key=lambda r: (rank_load[r], -usage[r][e], r))
        mine[r].append(e)
        free[r] -= 1
        rank_load[r] += load[e]
        node_load[n] += load[e]
    return LayerOwnership(num, tuple(tuple(sorted(ids)) for ids in mine))

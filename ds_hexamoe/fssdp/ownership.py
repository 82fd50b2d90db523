"""Whole-expert ownership (Hecate): which rank owns which experts of each MoE layer.

Each rank owns one contiguous range of expert ids per layer, sized in proportion to its shard
weight (``hexamoe.shard_weights``; even when null). The largest-remainder rounding hands the
leftover experts to different ranks in different layers, so even uneven splits balance over depth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..apportion import largest_remainder
from ..config import ConfigError


@dataclass(frozen=True)
class LayerOwnership:
    """Expert ranges of one layer: rank ``r`` owns ``starts[r]:starts[r+1]``."""

    num_experts: int
    starts: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.starts) - 1

    def count(self, rank: int) -> int:
        return self.starts[rank + 1] - self.starts[rank]

    def owned(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank + 1])

    def owner(self, expert: int) -> int:
        for r in range(self.world_size):
            if self.starts[r] <= expert < self.starts[r + 1]:
                return r
        raise IndexError(f"expert {expert} out of range [0, {self.num_experts})")

    def owners(self) -> list[int]:
        return [r for r in range(self.world_size) for _ in self.owned(r)]


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
    return LayerOwnership(num_experts=num_experts, starts=tuple(starts))

"""Expert placement tables and Hecate's token-to-replica rule for expert-parallel dispatch.

A placement is ``{expert: [ranks hosting a copy]}`` (replicas allowed), as the placement planner emits
per layer and step. Tables are cached per distinct placement, so switching placement between calls
costs one table build and nothing else: no restart, no re-registration.

Replica choice (DESIGN.md section 4): a pair goes to a local replica if one exists, else to the
replicas on the same node, else to any replica; the pairs a rank sends to one expert are split evenly
(round-robin in token order, starting at an offset given by the source rank, so ranks do not all
start on the same replica).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

Placement = Mapping[int, Sequence[int]]


def validate_placement(placement: Placement, num_experts: int, world_size: int) -> tuple[tuple[int, ...], ...]:
    """Check a placement and return it as ``key[e] = tuple(ranks)``; raise naming the bad entry."""
    if not isinstance(placement, Mapping):
        raise ValueError(f"placement: got {type(placement).__name__}; expected a dict {{expert: [ranks]}}")
    extra = sorted(k for k in placement if not isinstance(k, int) or not 0 <= k < num_experts)
    if extra:
        raise ValueError(f"placement: keys {extra[:5]} are not experts of this layer; expected integers in [0, {num_experts})")
    missing = [e for e in range(num_experts) if e not in placement]
    if missing:
        raise ValueError(
            f"placement: experts {missing[:8]} have no rank; every expert in [0, {num_experts}) needs at least one replica"
        )
    key = []
    for e in range(num_experts):
        ranks = placement[e]
        if isinstance(ranks, int) or not isinstance(ranks, Sequence) or len(ranks) == 0:
            raise ValueError(f"placement[{e}]: got {ranks!r}; expected a non-empty list of ranks in [0, {world_size})")
        bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < world_size]
        if bad:
            raise ValueError(f"placement[{e}]: ranks {bad} are out of range; expected ranks in [0, {world_size})")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"placement[{e}]: got {list(ranks)} with a repeated rank; list each hosting rank once")
        key.append(tuple(int(r) for r in ranks))
    return tuple(key)


def placement_digest(key: tuple[tuple[int, ...], ...]) -> int:
    """A 63-bit digest of a placement key, to check all ranks were given the same placement."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class PlacementTables:
    """Lookup tables for one placement."""

    key: tuple[tuple[int, ...], ...]
    world_size: int
    hosted: tuple[tuple[int, ...], ...]  # hosted[r]: experts rank r hosts, ascending (its local slot order)
    slot: torch.Tensor  # [W, E] int64: slot of expert e on rank r, -1 when absent
    _eligible: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return len(self.key)

    @classmethod
    def build(cls, key: tuple[tuple[int, ...], ...], world_size: int) -> PlacementTables:
        hosted = tuple(tuple(e for e, ranks in enumerate(key) if r in ranks) for r in range(world_size))
        slot = torch.full((world_size, len(key)), -1, dtype=torch.int64)
        for r, experts in enumerate(hosted):
            for s, e in enumerate(experts):
                slot[r, e] = s
        return cls(key=key, world_size=world_size, hosted=hosted, slot=slot)

    def slot_on(self, device: torch.device) -> torch.Tensor:
        if self.slot.device != device:
            self.slot = self.slot.to(device)
        return self.slot

    def eligible(self, rank: int, ranks_per_node: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table [E, R], n [E])``: replicas a pair from ``rank`` may go to, by Hecate's preference."""
        ck = (rank, ranks_per_node, str(device))
        if ck not in self._eligible:
            node = rank // ranks_per_node
            rows = []
            for ranks in self.key:
                if rank in ranks:
                    rows.append([rank])
                    continue
                same = [r for r in ranks if r // ranks_per_node == node]
                rows.append(same or list(ranks))
            width = max(len(r) for r in rows)
            table = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)
            n = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)
            self._eligible[ck] = (table, n)
        return self._eligible[ck]


class TablesCache:
    """Tables for the last few placements seen (placements alternate between a handful of plans)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._cache: OrderedDict = OrderedDict()

    def get(self, key: tuple[tuple[int, ...], ...], world_size: int) -> PlacementTables:
        ck = (key, world_size)
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        tables = PlacementTables.build(key, world_size)
        self._cache[ck] = tables
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return tables


def assign_destinations(
    flat_experts: torch.Tensor, sort_idx: torch.Tensor, offs: torch.Tensor, tables: PlacementTables, rank: int, ranks_per_node: int
) -> torch.Tensor:
    """Destination rank ``[P]`` of each pair (pair order), given the pairs' experts and their expert sort.

    ``sort_idx``/``offs`` are :class:`~ds_hexamoe.ops.ExpertIndex`'s ``idx``/``offs``: the position of a
    pair inside its expert's segment is its round-robin counter.
    """
    table, n = tables.eligible(rank, ranks_per_node, flat_experts.device)
    e_sorted = flat_experts.index_select(0, sort_idx)
    pos = torch.arange(sort_idx.numel(), device=sort_idx.device) - offs.index_select(0, e_sorted)
    choice = torch.remainder(pos + rank, n.index_select(0, e_sorted))
    dest_sorted = table[e_sorted, choice]
    dest = torch.empty_like(dest_sorted)
    dest[sort_idx] = dest_sorted
    return dest

"""Expert placement tables and Hecate's token-to-replica rule for expert-parallel dispatch.

A placement is ``{expert: [ranks hosting a copy]}`` (replicas allowed), as the placement planner emits
per layer and step; an expert may instead map to ``{rank: token fraction}``, the planner's split of
its tokens between unequal replicas (a slow rank's copy takes fewer). Tables are cached per distinct placement, so switching placement between calls
costs one table build and nothing else: no restart, no re-registration.

Replica choice (docs/design.md, "Execution modes"): a pair goes to a local replica if one exists, else to the
replicas on the same node, else to any replica; the pairs a rank sends to one expert are split evenly
(round-robin in token order, starting at an offset given by the source rank, so ranks do not all
start on the same replica). An expert given token fractions instead has every rank split its pairs
for it by those fractions (within one pair per replica), so the replicas' loads follow the plan the
planner scored.
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
        if isinstance(ranks, Mapping):  # {rank: token fraction}: its ranks, in the order given
            ranks = list(ranks)
        if isinstance(ranks, int) or not isinstance(ranks, Sequence) or len(ranks) == 0:
            raise ValueError(f"placement[{e}]: got {ranks!r}; expected a non-empty list of ranks in [0, {world_size})")
        bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < world_size]
        if bad:
            raise ValueError(f"placement[{e}]: ranks {bad} are out of range; expected ranks in [0, {world_size})")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"placement[{e}]: got {list(ranks)} with a repeated rank; list each hosting rank once")
        key.append(tuple(int(r) for r in ranks))
    return tuple(key)


def placement_weights(placement: Placement, key: tuple[tuple[int, ...], ...]) -> tuple | None:
    """Per expert, its replicas' token fractions in ``key`` order (normalized), or None for an expert given
    as a plain list of ranks (Hecate's rule); None when no expert has fractions. Raises naming the entry."""
    out, any_w = [], False
    for e, ranks in enumerate(key):
        v = placement[e]
        if not isinstance(v, Mapping):
            out.append(None)
            continue
        w = [v[r] for r in ranks]
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"placement[{e}]: got fractions {dict(v)!r}; expected numbers >= 0 with a positive sum")
        out.append(tuple(float(x) / sum(w) for x in w))
        any_w = True
    return tuple(out) if any_w else None


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
    weights: tuple | None = None  # per expert: replicas' token fractions (key order) or None
    _eligible: dict = field(default_factory=dict)
    _weighted: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return len(self.key)

    @classmethod
    def build(cls, key: tuple[tuple[int, ...], ...], world_size: int, weights: tuple | None = None) -> PlacementTables:
        hosted = tuple(tuple(e for e, ranks in enumerate(key) if r in ranks) for r in range(world_size))
        slot = torch.full((world_size, len(key)), -1, dtype=torch.int64)
        for r, experts in enumerate(hosted):
            for s, e in enumerate(experts):
                slot[r, e] = s
        return cls(key=key, world_size=world_size, hosted=hosted, slot=slot, weights=weights)

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


    def weighted(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ranks [E, W], upper [E, W], has [E])``: replicas and cumulative token fractions of experts
        with fractions (``has``); padding repeats the last replica with bound 2 (never chosen)."""
        ck = str(device)
        if ck not in self._weighted:
            width = max(len(r) for r in self.key)
            ranks, upper, has = [], [], []
            for e, rs in enumerate(self.key):
                w = self.weights[e] if self.weights is not None else None
                has.append(w is not None)
                w = w or (1.0 / len(rs),) * len(rs)
                cum = [float(sum(w[:i + 1])) for i in range(len(rs))]
                cum[-1] = 2.0  # rounding never leaves a pair without a replica
                ranks.append(list(rs) + [rs[-1]] * (width - len(rs)))
                upper.append(cum + [2.0] * (width - len(rs)))
            self._weighted[ck] = (torch.tensor(ranks, dtype=torch.int64, device=device),
                                  torch.tensor(upper, dtype=torch.float64, device=device),
                                  torch.tensor(has, dtype=torch.bool, device=device))
        return self._weighted[ck]


class TablesCache:
    """Tables for the last few placements seen (placements alternate between a handful of plans)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._cache: OrderedDict = OrderedDict()

    def get(self, key: tuple[tuple[int, ...], ...], world_size: int, weights: tuple | None = None) -> PlacementTables:
        ck = (key, world_size, weights)
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        tables = PlacementTables.build(key, world_size, weights)
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
    if tables.weights is not None:
        ranks, upper, has = tables.weighted(flat_experts.device)
        seg = offs.diff().index_select(0, e_sorted)
        # the pair's quantile in its segment, staggered per source rank (golden-ratio offsets)
        u = torch.remainder((pos.double() + 0.5) / seg.clamp_min(1).double() + 0.6180339887498949 * rank, 1.0)
        pick = (u[:, None] >= upper.index_select(0, e_sorted)).sum(dim=1)
        dest_sorted = torch.where(has.index_select(0, e_sorted), ranks[e_sorted, pick], dest_sorted)
    dest = torch.empty_like(dest_sorted)
    dest[sort_idx] = dest_sorted
    return dest

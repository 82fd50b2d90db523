"""Megatron-style token accounting for the expert-parallel and model-centric MoE paths.

One :class:`CallStats` per MoE layer call: tokens routed per expert, tokens dropped (always zero:
dispatch is dropless), rows each rank's experts computed, and every collective with the bytes this
rank sent to and received from *other* ranks (the self-chunk of an all-to-all is a local copy and not
counted). Backward collectives are appended to the same record when backward runs, so after
``loss.backward()`` a record holds the full step's traffic. :class:`TokenAccounting` keeps a bounded
history and aggregates it for logs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..distributed import host_all_reduce


@dataclass
class CollectiveRecord:
    """One collective call as seen by this rank."""

    name: str  # role in the layer: "counts", "dispatch", "combine", "gather", "reduce_scatter", ...
    op: str  # "all_to_all_v" | "all_gather" | "reduce_scatter" | "all_reduce"
    phase: str  # "forward" | "backward"
    bytes_sent: int  # to other ranks
    bytes_received: int  # from other ranks


@dataclass
class CallStats:
    """Accounting of one MoE layer call on one rank."""

    mode: str
    layer: int | None
    tokens: int  # local tokens T
    pairs: int  # local (token, expert) pairs T*k
    tokens_per_expert: list[int]  # local routing counts, length E
    rows_computed: int = 0  # rows this rank's expert kernels processed (pairs, or centroid rows under LSH)
    dropped_tokens: int = 0  # dropless: always zero, kept for Megatron-style logs
    lsh_compression: float | None = None  # rows sent / pairs bound to other ranks (1.0: no compression)
    lsh_rel_error: float | None = None  # ||y_lsh - y_exact|| / ||y_exact|| on this rank's tokens
    collectives: list[CollectiveRecord] = field(default_factory=list)

    def record(self, name: str, op: str, phase: str, bytes_sent: int, bytes_received: int) -> None:
        self.collectives.append(CollectiveRecord(name, op, phase, int(bytes_sent), int(bytes_received)))

    def bytes_sent(self, phase: str | None = None) -> int:
        return sum(c.bytes_sent for c in self.collectives if phase is None or c.phase == phase)

    def bytes_received(self, phase: str | None = None) -> int:
        return sum(c.bytes_received for c in self.collectives if phase is None or c.phase == phase)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenAccounting:
    """Bounded history of :class:`CallStats` plus running totals, cheap enough to keep on always."""

    def __init__(self, history: int = 256):
        self.calls: deque[CallStats] = deque(maxlen=history)
        self.total_calls = 0
        self.total_tokens = 0
        self.total_dropped = 0

    def new_call(self, mode: str, layer: int | None, tokens: int, pairs: int, tokens_per_expert: list[int]) -> CallStats:
        stats = CallStats(mode=mode, layer=layer, tokens=tokens, pairs=pairs, tokens_per_expert=tokens_per_expert)
        self.calls.append(stats)
        self.total_calls += 1
        self.total_tokens += tokens
        return stats

    def reset(self) -> None:
        self.calls.clear()
        self.total_calls = self.total_tokens = self.total_dropped = 0

    def last(self) -> CallStats | None:
        return self.calls[-1] if self.calls else None

    def summary(self) -> dict[str, Any]:
        """Aggregate over the kept history: bytes per (collective name, phase), load, LSH figures."""
        bytes_by: dict[str, int] = {}
        tpe: list[int] = []
        comp, err = [], []
        for c in self.calls:
            for r in c.collectives:
                key = f"{r.name}.{r.phase}.bytes_sent"
                bytes_by[key] = bytes_by.get(key, 0) + r.bytes_sent
            if len(tpe) < len(c.tokens_per_expert):
                tpe.extend([0] * (len(c.tokens_per_expert) - len(tpe)))
            for e, n in enumerate(c.tokens_per_expert):
                tpe[e] += n
            if c.lsh_compression is not None:
                comp.append(c.lsh_compression)
            if c.lsh_rel_error is not None:
                err.append(c.lsh_rel_error)
        out: dict[str, Any] = {
            "calls": len(self.calls),
            "tokens": sum(c.tokens for c in self.calls),
            "dropped_tokens": sum(c.dropped_tokens for c in self.calls),
            "tokens_per_expert": tpe,
            "bytes_sent": sum(bytes_by.values()),
            "bytes_by_collective": bytes_by,
        }
        if comp:
            out["lsh_compression_mean"] = sum(comp) / len(comp)
        if err:
            out["lsh_rel_error_mean"] = sum(err) / len(err)
        return out

    def global_tokens_per_expert(self, group=None) -> list[int]:
        """Tokens per expert summed over the kept history and all ranks (one all-reduce; for logs only)."""
        tpe = torch.tensor(self.summary()["tokens_per_expert"] or [0], dtype=torch.int64)
        return host_all_reduce(tpe, group=group).tolist()

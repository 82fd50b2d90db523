"""Byte accounting of ds-hexamoe's collectives: token collectives per MoE call, FSSDP weight bytes per step.

One :class:`CallStats` per MoE layer call of the expert-parallel and model-centric paths (Megatron-style):
tokens routed per expert, tokens dropped (always zero: dispatch is dropless), rows each rank's experts
computed, and every collective with the bytes this rank sent to and received from *other* ranks (the
self-chunk of an all-to-all is a local copy and not counted). Backward collectives are appended to the
same record when backward runs, so after ``loss.backward()`` a record holds the full step's traffic.
:class:`TokenAccounting` keeps a bounded history and aggregates it for logs.

:class:`CommStats` counts FSSDP's weight traffic (expert weights and gradients, by kind) and the time
the calling thread blocked on it (:func:`blocked`); :func:`with_token_bytes` reports both together.
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable
from contextlib import contextmanager
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
        return summarize_calls(self.calls)

    def global_tokens_per_expert(self, group=None) -> list[int]:
        """Tokens per expert summed over the kept history and all ranks (one all-reduce; for logs only)."""
        tpe = torch.tensor(self.summary()["tokens_per_expert"] or [0], dtype=torch.int64)
        return host_all_reduce(tpe, group=group).tolist()


def summarize_calls(calls: Iterable[CallStats]) -> dict[str, Any]:
    """Aggregate of ``calls``: bytes per (collective name, phase), load, LSH figures."""
    calls = list(calls)
    bytes_by: dict[str, int] = {}
    tpe: list[int] = []
    comp, err = [], []
    for c in calls:
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
        "calls": len(calls),
        "tokens": sum(c.tokens for c in calls),
        "dropped_tokens": sum(c.dropped_tokens for c in calls),
        "tokens_per_expert": tpe,
        "bytes_sent": sum(bytes_by.values()),
        "bytes_by_collective": bytes_by,
    }
    if comp:
        out["lsh_compression_mean"] = sum(comp) / len(comp)
    if err:
        out["lsh_rel_error_mean"] = sum(err) / len(err)
    return out


@dataclass
class CommStats:
    """Bytes this rank sent (payload) per step, by collective, and per (layer, expert).

    ``as_dict()``: the keys ending in ``bytes`` are disjoint parts of what this rank sent (their sum is
    ``total``); ``received`` and ``per_expert`` (``{(layer, expert): bytes}``) are separate views.
    ``exposed_comm_s``: seconds the calling thread blocked on FSSDP's collectives (not their issue).
    """

    mask_bytes: int = 0  # active-mask (expert load) all_gather
    gather_bytes: int = 0  # forward SparseAllGather (the predicted gather under the hecate schedule)
    calibrate_bytes: int = 0  # forward calibration gather: experts used but not predicted (hecate)
    regather_bytes: int = 0  # backward re-materialization
    reduce_bytes: int = 0  # SparseReduceScatter of gradients
    norm_bytes: int = 0  # expert part of the global gradient norm / overflow flag
    recv_bytes: int = 0  # payload received by this rank (all sparse collectives)
    collectives: int = 0  # sparse all_to_all calls actually issued (each tree round counts)
    skipped: int = 0  # sparse exchanges skipped because nothing had to move
    experts_sent: int = 0  # expert copies (weights or gradients) sent
    calibrations: int = 0  # calibration gathers issued
    loads_deferred: int = 0  # layer calls whose load exchange ran asynchronously (the prediction covered all)
    trees: int = 0  # sparse exchanges that ran as broadcast/reduce trees (fssdp.fanout)
    tree_rounds: int = 0  # all_to_all rounds those trees took
    tree_rounds_ahead: int = 0  # rounds after a tree's first issued asynchronously at a later exchange
    exposed_s: float = 0.0
    exposed_by: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # by what was waited for
    expert_bytes: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total_bytes(self) -> int:
        return (self.mask_bytes + self.gather_bytes + self.calibrate_bytes + self.regather_bytes + self.reduce_bytes
                + self.norm_bytes)

    def count_sent(self, layer_index: int, per_peer, bytes_per_expert: int, kind: str) -> int:
        """Account the expert copies ``per_peer`` (experts per destination) under ``kind``; returns the bytes."""
        sent = 0
        for experts in per_peer:
            for e in experts:
                self.expert_bytes[(layer_index, e)] += bytes_per_expert
                sent += bytes_per_expert
                self.experts_sent += 1
        setattr(self, kind, getattr(self, kind) + sent)
        return sent

    def as_dict(self) -> dict:
        return {
            "mask_bytes": self.mask_bytes, "gather_bytes": self.gather_bytes, "calibrate_bytes": self.calibrate_bytes,
            "regather_bytes": self.regather_bytes, "calibrations": self.calibrations, "exposed_comm_s": self.exposed_s,
            "exposed_by": dict(self.exposed_by),
            "reduce_bytes": self.reduce_bytes, "norm_bytes": self.norm_bytes, "total": self.total_bytes,
            "received": self.recv_bytes, "collectives": self.collectives, "skipped": self.skipped,
            "experts_sent": self.experts_sent, "loads_deferred": self.loads_deferred, "trees": self.trees,
            "tree_rounds": self.tree_rounds, "tree_rounds_ahead": self.tree_rounds_ahead, "per_expert": dict(self.expert_bytes),
        }


@contextmanager
def blocked(stats: CommStats | None, what: str = "other"):
    """Count the enclosed wall time as exposed communication (the thread blocks on a collective), also under
    ``stats.exposed_by[what]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if stats is not None:
            dt = time.perf_counter() - t0
            stats.exposed_s += dt
            stats.exposed_by[what] += dt


def with_token_bytes(comm: dict, calls: list[CallStats]) -> dict:
    """``comm`` (a :meth:`CommStats.as_dict`) with the token collectives of ``calls`` added: ``token_bytes``
    (counted in ``total``) and, under LSH, ``lsh_compression`` and ``lsh_rel_error`` (means over calls)."""
    if calls:
        s = summarize_calls(calls)
        comm["token_bytes"] = s["bytes_sent"]
        comm["total"] += s["bytes_sent"]
        for k in ("lsh_compression", "lsh_rel_error"):
            if f"{k}_mean" in s:
                comm[k] = s[f"{k}_mean"]
    return comm

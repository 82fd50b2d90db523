"""A routing trace: tokens per expert per MoE layer, one row per forward, as ``ds-hexamoe profile-routing
--trace`` records it (the rows are :func:`~.stats.stats_delta` of the one collector between forwards, summed
over ranks by :func:`~.collector.reduce_stats`) and the honest simulation protocol replays it
(:func:`ds_hexamoe.placement.protocol.trace_from_file`). Plain Python, no torch.

File schema (JSON, ``"version": 1``; docs/placement.md, "Routing traces")::

    {"format": "ds-hexamoe routing trace", "version": 1, "row": "forward",
     "layers": [name, ...], "num_experts": [E_l, ...], "top_k": [k_l, ...],
     "tokens": [[tokens of layer l in row i, ...], ...],          # [I][L]
     "counts": [[[pairs routed to expert e, ...], ...], ...],      # [I][L][E_l]
     "model": {model shape fields} | null, "source": {free-form provenance}}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from .stats import RoutingStats, _int

FORMAT = "ds-hexamoe routing trace"
VERSION = 1
ROW = "forward"  # one row per forward (micro-batch) of profile-routing; the model is not updated between rows


@dataclass
class RoutingTrace:
    """Rows of per-layer expert counts; ``counts[i][l][e]`` (token, expert) pairs, ``tokens[i][l]`` tokens."""

    layers: list[str]
    num_experts: list[int]
    top_k: list[int]
    counts: list[list[list[int]]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    model: dict | None = None
    source: dict = field(default_factory=dict)

    @classmethod
    def like(cls, stats: RoutingStats, **source) -> RoutingTrace:
        """An empty trace with the layers, experts and top-k of ``stats``."""
        return cls(list(stats.layers), [stats.num_experts(l) for l in stats.layers],
                   [stats.top_k[l] for l in stats.layers], model=stats.model, source=dict(source))

    def append(self, row: RoutingStats) -> None:
        """Add one row: the statistics of one forward (same layers and experts as the trace)."""
        if list(row.layers) != self.layers or [row.num_experts(l) for l in row.layers] != self.num_experts:
            raise ValueError(f"trace row {len(self.counts)}: layers {row.layers[:2]}... with "
                             f"{[row.num_experts(l) for l in row.layers]} experts; expected those of the trace")
        self.counts.append([list(row.counts[l]) for l in self.layers])
        self.tokens.append([row.tokens[l] for l in self.layers])

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "row": ROW, "layers": list(self.layers),
                "num_experts": list(self.num_experts), "top_k": list(self.top_k), "tokens": self.tokens,
                "counts": self.counts, "model": self.model, "source": self.source}

    def save_json(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader sees the old file or the whole new one."""
        from ..atomic import atomic_write

        atomic_write(os.fspath(path), json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> RoutingTrace:
        from ..jsonfile import read_json

        where = f"trace {os.fspath(path)}"
        return cls.from_dict(read_json(path, "routing trace", "record one with `ds-hexamoe profile-routing "
                                                              "RECIPE.json --trace FILE`"), where)

    @classmethod
    def from_dict(cls, d: Any, where: str = "trace") -> RoutingTrace:
        """Validate and build; every error names the field and the fix."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError(f"{where}.format: expected {FORMAT!r}; record the trace with `ds-hexamoe "
                              "profile-routing RECIPE.json --trace FILE`")
        if d.get("version") != VERSION:
            raise ConfigError(f"{where}.version: got {d.get('version')!r}; this package reads version {VERSION}")
        allowed = {"format", "version", "row", "layers", "num_experts", "top_k", "tokens", "counts", "model", "source"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown key; allowed keys are {sorted(allowed)}")
        if d.get("row") != ROW:
            raise ConfigError(f"{where}.row: got {d.get('row')!r}; version {VERSION} has one row per {ROW!r}")
        layers = d.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers) \
                or len(set(layers)) != len(layers):
            raise ConfigError(f"{where}.layers: got {layers!r}; expected a non-empty list of distinct layer names")
        L = len(layers)
        ne, tk = _ints(d.get("num_experts"), L, f"{where}.num_experts", 1), _ints(d.get("top_k"), L, f"{where}.top_k", 1)
        counts, tokens = d.get("counts"), d.get("tokens")
        if not isinstance(counts, list) or not counts:
            raise ConfigError(f"{where}.counts: empty; a trace needs at least one row (record more --batches)")
        if not isinstance(tokens, list) or len(tokens) != len(counts):
            raise ConfigError(f"{where}.tokens: expected one row per row of counts ({len(counts)})")
        for i, (row, trow) in enumerate(zip(counts, tokens)):
            t = _ints(trow, L, f"{where}.tokens[{i}]")
            if not isinstance(row, list) or len(row) != L:
                raise ConfigError(f"{where}.counts[{i}]: expected {L} layers")
            for l in range(L):
                c = _ints(row[l], ne[l], f"{where}.counts[{i}][{l}]")
                if sum(c) > t[l] * tk[l]:
                    raise ConfigError(f"{where}.counts[{i}][{l}]: sum {sum(c)} > tokens * top_k = {t[l] * tk[l]}")
        model, source = d.get("model"), d.get("source", {})
        if model is not None and not isinstance(model, dict) or not isinstance(source, dict):
            raise ConfigError(f"{where}.model/source: expected JSON objects (model may be null)")
        return cls(list(layers), ne, tk, [[list(c) for c in row] for row in counts], [list(t) for t in tokens],
                   model, dict(source))


def _ints(v: Any, n: int, path: str, low: int = 0) -> list[int]:
    if not isinstance(v, list) or len(v) != n:
        raise ConfigError(f"{path}: got {v!r:.80}; expected a list of {n} integers >= {low}")
    return [_int(x, f"{path}[{i}]", low) for i, x in enumerate(v)]

"""Routing statistics: tokens per expert per layer and the cross-layer affinity ``A[l][i][j]``.

The experts forward calls :meth:`RoutingStatsCollector.record` once per MoE layer and micro-batch.
Counting is one ``bincount`` per layer (and one per consecutive layer pair for the affinity) on the
routing tensor's device: no host sync, no per-token Python. Host copies are made only when the
statistics are read.

Affinity: within one forward, layers are chained in call order; for the same token rows, every
(choice in layer l, choice in layer l+1) pair counts once, so ``A[l].sum() == T * k_l * k_{l+1}``.
Layers whose token counts differ (Swin's patch merging) get no affinity between them.

Re-computation (activation checkpointing, FSSDP re-materialization) runs a layer's forward again in
backward, which would count its tokens twice. It cannot be detected from inside the forward, so the
collector dedupes by forward boundaries: between two :meth:`step` calls only the first call per layer
counts. Call ``step()`` once per micro-batch, before (or after) its forward.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

_ACTIVE: "RoutingStatsCollector | None" = None


def set_collector(collector: "RoutingStatsCollector | None") -> "RoutingStatsCollector | None":
    """Make ``collector`` the one the experts forward records into (None: stop); returns the previous."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, collector
    return prev


def get_collector() -> "RoutingStatsCollector | None":
    return _ACTIVE


# ----------------------------------------------------------------------------------- host-side stats
@dataclass
class RoutingStats:
    """Routing statistics on the host, JSON round-trippable.

    ``counts[layer][e]``: (token, expert) pairs routed to ``e``; ``tokens[layer]``: tokens seen;
    ``top_k[layer]``; ``affinity[(a, b)][i][j]``: pairs with choice ``i`` in ``a`` and ``j`` in ``b``,
    ``b`` the layer called after ``a``. ``model``: optional model shape fields (from profile-routing).
    """

    layers: list[str]
    counts: dict[str, list[int]]
    tokens: dict[str, int]
    top_k: dict[str, int]
    affinity: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict)
    forwards: int = 0
    model: dict | None = None

    def num_experts(self, layer: str) -> int:
        return len(self.counts[layer])

    def next_layer(self, layer: str) -> str | None:
        i = self.layers.index(layer)
        return self.layers[i + 1] if i + 1 < len(self.layers) else None

    def load(self) -> dict[str, list[int]]:
        return {l: list(self.counts[l]) for l in self.layers}

    def balance(self) -> dict[str, Any]:
        """``max / mean`` expert load per layer (1.0 is perfect) and overall.

        Overall is ``sum_l max_l / sum_l mean_l``: the slowdown of a step whose layers each wait for
        their busiest expert, relative to perfect balance.
        """
        return _balance(self.layers, self.counts)

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "layers": list(self.layers),
            "forwards": self.forwards,
            "per_layer": {l: {"counts": list(self.counts[l]), "tokens": self.tokens[l], "top_k": self.top_k[l]}
                          for l in self.layers},
            "affinity": [{"from": a, "to": b, "counts": m} for (a, b), m in self.affinity.items()],
            "balance": self.balance(),
            **({"model": self.model} if self.model else {}),
        }

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    @classmethod
    def from_dict(cls, d: Any, where: str = "stats") -> "RoutingStats":
        """Validate and build; every error names the field (``stats.per_layer['l0'].counts[3]: ...``)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: got {type(d).__name__}; expected a JSON object with 'layers' and 'per_layer'")
        allowed = {"version", "layers", "forwards", "per_layer", "affinity", "balance", "model"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown key; allowed keys are {sorted(allowed)}")
        layers = d.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
            raise ConfigError(f"{where}.layers: got {layers!r}; expected a non-empty list of layer names")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{where}.layers: names repeat; expected each MoE layer once, in call order")
        per = d.get("per_layer")
        if not isinstance(per, dict):
            raise ConfigError(f"{where}.per_layer: got {per!r}; expected an object layer -> {{counts, tokens, top_k}}")
        counts, tokens, top_k = {}, {}, {}
        for l in layers:
            p = f"{where}.per_layer[{l!r}]"
            if l not in per or not isinstance(per[l], dict):
                raise ConfigError(f"{p}: missing; every name in 'layers' needs an entry with counts, tokens, top_k")
            c = per[l].get("counts")
            if not isinstance(c, list) or not c:
                raise ConfigError(f"{p}.counts: got {c!r}; expected a non-empty list of integers >= 0 (one per expert)")
            for i, v in enumerate(c):
                _int(v, f"{p}.counts[{i}]")
            t = _int(per[l].get("tokens"), f"{p}.tokens")
            k = _int(per[l].get("top_k"), f"{p}.top_k", low=1)
            if sum(c) > t * k:
                raise ConfigError(f"{p}.counts: sum {sum(c)} > tokens * top_k = {t * k}; the counts are (token, expert) pairs")
            counts[l], tokens[l], top_k[l] = list(c), t, k
        extra_layers = sorted(set(per) - set(layers))
        if extra_layers:
            raise ConfigError(f"{where}.per_layer[{extra_layers[0]!r}]: not listed in 'layers'")
        aff = {}
        raw = d.get("affinity", [])
        if not isinstance(raw, list):
            raise ConfigError(f"{where}.affinity: got {raw!r}; expected a list of {{from, to, counts}}")
        for n, a in enumerate(raw):
            p = f"{where}.affinity[{n}]"
            if not isinstance(a, dict) or set(a) != {"from", "to", "counts"}:
                raise ConfigError(f"{p}: got {a!r}; expected an object with exactly 'from', 'to', 'counts'")
            src, dst, m = a["from"], a["to"], a["counts"]
            for key, name in (("from", src), ("to", dst)):
                if name not in counts:
                    raise ConfigError(f"{p}.{key}: got {name!r}; expected a name from 'layers'")
            ei, ej = len(counts[src]), len(counts[dst])
            if not isinstance(m, list) or len(m) != ei or not all(isinstance(r, list) and len(r) == ej for r in m):
                raise ConfigError(f"{p}.counts: expected a {ei} x {ej} matrix (experts of {src!r} x experts of {dst!r})")
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    _int(v, f"{p}.counts[{i}][{j}]")
            aff[(src, dst)] = [list(r) for r in m]
        forwards = _int(d.get("forwards", 0), f"{where}.forwards")
        model = d.get("model")
        if model is not None and not isinstance(model, dict):
            raise ConfigError(f"{where}.model: got {model!r}; expected an object of model shape fields")
        return cls(list(layers), counts, tokens, top_k, aff, forwards, model)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "RoutingStats":
        from ..config import read_json

        return cls.from_dict(read_json(path, "stats file", "create one with `ds-hexamoe profile-routing RECIPE.json`"))


def _int(v: Any, path: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{path}: got {v!r}; expected an integer >= {low}")
    return v


def _balance(layers: list[str], counts: dict[str, list[int]]) -> dict[str, Any]:
    per, smax, smean = {}, 0.0, 0.0
    for l in layers:
        c = counts[l]
        mean = sum(c) / len(c)
        per[l] = (max(c) / mean) if mean > 0 else 1.0
        smax += max(c)
        smean += mean
    return {"per_layer": per, "overall": (smax / smean) if smean > 0 else 1.0}


# ------------------------------------------------------------------------------------------ collector
class RoutingStatsCollector:
    """Accumulates routing counts on device; see the module docstring for the semantics."""

    def __init__(self, affinity: bool = True, dedupe: bool = True):
        self.affinity_enabled = affinity
        self.dedupe = dedupe
        self.reset()

    def reset(self) -> None:
        self._counts: dict[str, Any] = {}  # layer -> LongTensor[E]
        self._tokens: dict[str, int] = {}
        self._top_k: dict[str, int] = {}
        self._aff: dict[tuple[str, str], Any] = {}
        self._order: list[str] = []
        self._seen: set[str] = set()
        self._prev: tuple[str, Any] | None = None  # last recorded (layer, top_k_index) of this forward
        self.forwards = 0
        self.affinity_skipped = 0  # consecutive layers with different token counts
        self.model: dict | None = None

    def step(self) -> None:
        """Mark a forward boundary: the next call per layer counts again."""
        if self._seen:
            self.forwards += 1
        self._seen = set()
        self._prev = None

    def record(self, layer: str, top_k_index, num_experts: int) -> None:
        """Count one layer's routing ``top_k_index[T, k]`` (expert ids < ``num_experts``)."""
        import torch

        if layer in self._seen:
            if self.dedupe:
                return  # re-computation of a layer already counted in this forward
            self.step()  # without dedupe a repeated layer starts the next forward
        idx = top_k_index.detach()
        if idx.dim() == 1:
            idx = idx.unsqueeze(1)
        if idx.dim() != 2:
            raise ValueError(f"record({layer!r}): top_k_index has shape {list(idx.shape)}; expected [tokens, top_k]")
        idx = idx.long()
        t, k = idx.shape
        if layer not in self._counts:
            self._counts[layer] = torch.zeros(num_experts, dtype=torch.long, device=idx.device)
            self._tokens[layer], self._top_k[layer] = 0, k
            self._order.append(layer)
        elif self._counts[layer].numel() != num_experts or self._top_k[layer] != k:
            raise ValueError(f"record({layer!r}): got {num_experts} experts, top_k={k}; earlier calls had "
                             f"{self._counts[layer].numel()} experts, top_k={self._top_k[layer]}")
        # expert-parallel paths mask non-local choices with ids >= num_experts: a spill bin drops them
        idx = idx.clamp(0, num_experts)
        self._counts[layer] += torch.bincount(idx.reshape(-1), minlength=num_experts + 1)[:num_experts]
        self._tokens[layer] += t
        self._seen.add(layer)
        if self.affinity_enabled and self._prev is not None:
            prev_layer, prev = self._prev
            if prev.shape[0] == t:
                ep = self._counts[prev_layer].numel()
                # every (choice a in prev, choice b in this) pair of the same token row: a * (E + 1) + b
                pair = prev[:, :, None] * (num_experts + 1) + idx[:, None, :]
                m = torch.bincount(pair.reshape(-1), minlength=(ep + 1) * (num_experts + 1))
                m = m.view(ep + 1, num_experts + 1)[:ep, :num_experts]
                key = (prev_layer, layer)
                if key in self._aff:
                    self._aff[key] += m
                else:
                    self._aff[key] = m.clone()
            else:
                self.affinity_skipped += 1
        self._prev = (layer, idx)

    # -- reading ------------------------------------------------------------------------------------
    def snapshot(self) -> RoutingStats:
        """The statistics so far, on the host."""
        counts = {l: [int(v) for v in self._counts[l].tolist()] for l in self._order}
        aff = {key: [[int(v) for v in row] for row in m.tolist()] for key, m in self._aff.items()}
        return RoutingStats(list(self._order), counts, dict(self._tokens), dict(self._top_k), aff,
                            self.forwards + (1 if self._seen else 0), self.model)

    def load(self) -> dict[str, list[int]]:
        return self.snapshot().load()

    def balance(self) -> dict[str, Any]:
        return self.snapshot().balance()

    def to_dict(self) -> dict:
        return self.snapshot().to_dict()

    def save_json(self, path: str | os.PathLike) -> None:
        self.snapshot().save_json(path)

    def all_reduce(self, group=None) -> None:
        """Sum counts, tokens and affinity over the ranks of ``group`` (no-op without torch.distributed).

        Every rank must have recorded the same layers (same model); a mismatch raises naming them.
        """
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        keys = (list(self._order), sorted(self._aff))
        seen: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(seen, keys, group=group)
        for r, other in enumerate(seen):
            if tuple(other) != keys:
                raise RuntimeError(f"RoutingStatsCollector.all_reduce: rank {r} recorded layers {other[0]} and pairs "
                                   f"{other[1]}, this rank {keys[0]} and {keys[1]}; all ranks must run the same layers")
        tensors = [self._counts[l] for l in self._order] + [self._aff[k] for k in sorted(self._aff)]
        dev = tensors[0].device if tensors else torch.device("cpu")
        if dist.get_backend(group) == "gloo":
            dev = torch.device("cpu")
        done = self.forwards + (1 if self._seen else 0)
        toks = torch.tensor([self._tokens[l] for l in self._order] + [done], dtype=torch.long)
        flat = torch.cat([t.reshape(-1).to(dev) for t in tensors] + [toks.to(dev)])
        dist.all_reduce(flat, group=group)
        off = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t).to(t.device))
            off += n
        tail = [int(v) for v in flat[off:].tolist()]
        for l, v in zip(self._order, tail):
            self._tokens[l] = v
        # the summed forwards include this rank's open one, which snapshot() adds back
        self.forwards = tail[-1] - (1 if self._seen else 0)


def synthetic_stats(
    num_layers: int,
    num_experts: int,
    tokens: int,
    top_k: int,
    *,
    skew: float = 1.0,
    stickiness: float = 0.5,
    seed: int = 0,
    layer_prefix: str = "model.layers.{}.mlp.experts",
) -> RoutingStats:
    """Routing statistics drawn from a skewed (Zipf ``skew``) router with cross-layer stickiness.

    Each layer permutes the Zipf popularity so hot experts differ per layer; with probability
    ``stickiness`` a token's choices in layer l+1 are a fixed per-layer map of its choices in l (the
    affinity structure real MoE models show). Used by benchmarks, tests and the shipped example.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    k = min(top_k, num_experts)
    zipf = np.arange(1, num_experts + 1, dtype=float) ** (-skew)
    layers = [layer_prefix.format(i) for i in range(num_layers)]
    counts, toks, topk, aff = {}, {}, {}, {}
    prev = None
    for li, name in enumerate(layers):
        pop = zipf[rng.permutation(num_experts)]
        pop = pop / pop.sum()
        # Gumbel top-k: k distinct experts per token, drawn from ``pop``
        g = np.log(pop)[None, :] - np.log(-np.log(rng.random((tokens, num_experts))))
        choice = np.argsort(-g, axis=1)[:, :k]
        if prev is not None and stickiness > 0:
            follow = rng.permutation(num_experts)  # a bijection keeps a row's choices distinct
            stick = rng.random(tokens) < stickiness
            choice[stick] = follow[prev[stick]]
        c = np.bincount(choice.reshape(-1), minlength=num_experts)
        counts[name], toks[name], topk[name] = [int(v) for v in c], tokens, k
        if prev is not None:
            m = np.zeros((num_experts, num_experts), dtype=np.int64)
            np.add.at(m, (np.repeat(prev, k, axis=1).reshape(-1), np.tile(choice, (1, k)).reshape(-1)), 1)
            aff[(layers[li - 1], name)] = m.tolist()
        prev = choice
    return RoutingStats(layers, counts, toks, topk, aff, 1, None)


# ------------------------------------------------------------------------------- windows and ranks
def uniform_stats(layers: list[str], num_experts: list[int] | int, tokens: int, top_k: list[int] | int) -> RoutingStats:
    """Statistics of a perfectly balanced router: ``tokens * top_k / E`` pairs per expert, no affinity.

    What the planner is given when no measured statistics exist yet (``hexamoe.stats_path`` unset)."""
    n = len(layers)
    E = [num_experts] * n if isinstance(num_experts, int) else list(num_experts)
    K = [top_k] * n if isinstance(top_k, int) else list(top_k)
    counts = {}
    for l, e, k in zip(layers, E, K):
        base, rem = divmod(tokens * k, e)
        counts[l] = [base + (1 if i < rem else 0) for i in range(e)]
    return RoutingStats(list(layers), counts, {l: tokens for l in layers}, dict(zip(layers, K)), {}, 1, None)


def stats_delta(now: RoutingStats, before: RoutingStats | None) -> RoutingStats:
    """The statistics recorded between two snapshots of the same collector (``now - before``)."""
    if before is None or not before.layers:
        return now
    counts, tokens, aff = {}, {}, {}
    for l in now.layers:
        prev = before.counts.get(l, [0] * len(now.counts[l]))
        counts[l] = [a - b for a, b in zip(now.counts[l], prev)]
        tokens[l] = now.tokens[l] - before.tokens.get(l, 0)
    for key, m in now.affinity.items():
        pm = before.affinity.get(key)
        aff[key] = [list(r) for r in m] if pm is None else [[a - b for a, b in zip(r, q)] for r, q in zip(m, pm)]
    return RoutingStats(list(now.layers), counts, tokens, dict(now.top_k), aff, now.forwards - before.forwards, now.model)


def reduce_stats(stats: RoutingStats, group=None) -> RoutingStats:
    """``stats`` summed over the ranks of ``group`` (a collective; every rank passes the same layers).

    Unlike :meth:`RoutingStatsCollector.all_reduce` nothing is changed in place, so windows of one
    collector can be reduced again later. Without torch.distributed: ``stats`` itself."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return stats
    keys = (list(stats.layers), sorted(stats.affinity), [len(stats.counts[l]) for l in stats.layers])
    seen: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, keys, group=group)
    for r, other in enumerate(seen):
        if tuple(other) != keys:
            raise RuntimeError(f"reduce_stats: rank {r} recorded layers {other[0]}, this rank {keys[0]}; all ranks must "
                               "run the same MoE layers before statistics can be summed")
    pairs = sorted(stats.affinity)
    flat = [v for l in stats.layers for v in stats.counts[l]] + [stats.tokens[l] for l in stats.layers]
    flat += [v for p in pairs for row in stats.affinity[p] for v in row] + [stats.forwards]
    t = torch.tensor(flat, dtype=torch.float64)  # exact for counts below 2**53 on gloo and NCCL alike
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    vals = [int(v) for v in t.cpu().round().tolist()]
    off, counts, tokens, aff = 0, {}, {}, {}
    for l in stats.layers:
        n = len(stats.counts[l])
        counts[l] = vals[off:off + n]
        off += n
    for l in stats.layers:
        tokens[l] = vals[off]
        off += 1
    for p in pairs:
        rows = []
        for row in stats.affinity[p]:
            rows.append(vals[off:off + len(row)])
            off += len(row)
        aff[p] = rows
    return RoutingStats(list(stats.layers), counts, tokens, dict(stats.top_k), aff, vals[off], stats.model)

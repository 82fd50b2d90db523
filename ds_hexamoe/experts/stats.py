"""Routing statistics on the host: tokens per expert per layer, cross-layer affinity, and load balance.

:class:`RoutingStats` is what the collector (:mod:`.collector`) snapshots, what ``ds-hexamoe
profile-routing`` writes and what the placement planner reads. It is plain Python (no torch), JSON
round-trippable, and validated field by field when loaded.

Balance, everywhere in the package (metrics, progress bar, Trainer logs, plans): per layer, tokens of the
busiest expert over the mean tokens per expert (1.0 is perfect); overall, the mean of the per-layer
figures over the layers (docs/design.md, "Experts protocol and routing statistics").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

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
        """``max / mean`` expert load per layer (1.0 is perfect) and overall (see :func:`balance`)."""
        return balance({l: self.counts[l] for l in self.layers})

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
        from ..jsonfile import read_json

        return cls.from_dict(read_json(path, "stats file", "create one with `ds-hexamoe profile-routing RECIPE.json`"))


def _int(v: Any, path: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{path}: got {v!r}; expected an integer >= {low}")
    return v


def layer_balance(counts) -> float:
    """Busiest expert over the mean load of one layer's per-expert counts (1.0 when nothing was routed)."""
    counts = [float(c) for c in counts]
    mean = sum(counts) / len(counts) if counts else 0.0
    return max(counts) / mean if mean > 0 else 1.0


def balance(counts_by_layer: dict[str, Any]) -> dict[str, Any]:
    """``{"per_layer": {layer: max/mean}, "overall": mean over layers}``: the package's one balance figure."""
    per = {l: layer_balance(c) for l, c in counts_by_layer.items()}
    return {"per_layer": per, "overall": sum(per.values()) / len(per) if per else 1.0}


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

"""The honest simulation protocol for placements decided from load history (Hecate, EPLB replicas, FSSDP's
predicted gathers): loads drift over iterations, each contender decides from the iterations before the
one it is scored on, never from that one.

A trace is ``loads[I, L, E]``: (token, expert) pairs per iteration, MoE layer and expert, recorded
(:func:`trace_from_file`: the per-forward trace ``ds-hexamoe profile-routing --trace`` writes;
:func:`trace_from_stats`: one :class:`~ds_hexamoe.experts.stats.RoutingStats` per iteration) or synthetic (:func:`drifting_zipf`: a Zipf router whose hot
set moves). :func:`honest_protocol` hands each contender's ``decide`` a copy of the ``window`` iterations
before iteration ``i`` and scores the decision on iteration ``i``; a contender that decides after the
gate (FasterMoE's shadowing) says so and is given iteration ``i`` itself (``sees_current``), as the
runtime it models would. An oracle (a decision from the scored iteration's own loads) is an upper bound,
never a result.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from ..experts.stats import RoutingStats
from ..experts.trace import RoutingTrace


@dataclass(frozen=True)
class Protocol:
    """How loads drift and how much history a decision sees (printed beside every number)."""

    iterations: int = 12
    window: int = 5  # the runtime's fssdp.history
    drift_every: int = 2  # iterations between moves of the hot set (synthetic trace)
    skew: float = 1.0  # Zipf exponent of the synthetic router
    seed: int = 0

    def check(self) -> None:
        if self.window < 1 or self.iterations <= self.window:
            raise ConfigError(f"protocol: window {self.window}, iterations {self.iterations}; expected "
                              "1 <= window < iterations (at least one iteration to score)")
        if self.drift_every < 1 or self.skew < 0:
            raise ConfigError(f"protocol: drift_every {self.drift_every}, skew {self.skew}; expected drift_every >= 1 "
                              "and skew >= 0")

    def describe(self, trace: str = "synthetic") -> str:
        """``trace``: "synthetic", or the name of a recorded trace file (``self.iterations`` its rows)."""
        src = (f"synthetic Zipf top-k router (skew {self.skew}) whose hot set moves by one expert every "
               f"{self.drift_every} iterations" if trace == "synthetic"
               else f"recorded trace: {trace}, {self.iterations} iterations (one per forward)")
        return (f"honest: {src}; decided from the {self.window} iterations before, scored on the next; "
                f"mean over {self.iterations - self.window} scored iterations")


def drifting_zipf(p: Protocol, layers: int, experts: int, top_k: int, tokens: int = 8192) -> np.ndarray:
    """``loads[I, L, E]``: per layer a fixed permutation of Zipf popularities, rolled by one expert every
    ``drift_every`` iterations; each iteration ``tokens`` tokens pick ``top_k`` distinct experts from it (Gumbel
    top-k, as :func:`~ds_hexamoe.experts.stats.synthetic_stats` routes), their pairs counted per expert."""
    p.check()
    rng = np.random.default_rng(p.seed)
    k = min(top_k, experts)
    zipf = np.arange(1, experts + 1, dtype=float) ** (-p.skew)
    base = np.stack([zipf[rng.permutation(experts)] for _ in range(layers)])
    out = np.zeros((p.iterations, layers, experts))
    for i in range(p.iterations):
        pop = np.roll(base, i // p.drift_every, axis=1)
        for l in range(layers):
            g = np.log(pop[l] / pop[l].sum())[None, :] - np.log(-np.log(rng.random((tokens, experts))))
            choice = np.argpartition(-g, k - 1, axis=1)[:, :k]
            out[i, l] = np.bincount(choice.reshape(-1), minlength=experts)
    return out


def trace_from_stats(stats: Sequence[RoutingStats]) -> np.ndarray:
    """``loads[I, L, E]`` from one statistics object per iteration (same layers and experts in each)."""
    if not stats:
        raise ConfigError("trace: got no iterations; expected one routing-statistics object per iteration")
    layers = stats[0].layers
    for i, s in enumerate(stats):
        if s.layers != layers:
            raise ConfigError(f"trace[{i}].layers: {s.layers[:2]}...; expected the layers of trace[0] ({layers[:2]}...)")
    return np.array([[s.counts[l] for l in layers] for s in stats], dtype=float)


def trace_from_file(path, num_moe_layers: int | None = None, num_experts: int | None = None,
                    min_rows: int = 1) -> np.ndarray:
    """``loads[I, L, E]`` of a recorded trace file, checked against the model shape it will be replayed on
    (:func:`check_trace_shape`, when given) and against ``min_rows``."""
    t = RoutingTrace.load_json(path)
    where = f"trace {path}"
    if len(set(t.num_experts)) != 1:
        raise ConfigError(f"{where}.num_experts: {t.num_experts}; the protocol needs the same expert count in every layer")
    loads = np.array(t.counts, dtype=float)
    if num_moe_layers is not None or num_experts is not None:
        check_trace_shape(loads, where, num_moe_layers, num_experts)
    if len(loads) < min_rows:
        raise ConfigError(f"{where}.counts: {len(loads)} rows; expected at least {min_rows} (the window and one "
                          "iteration to score): record more --batches")
    return loads


def check_trace_shape(loads: np.ndarray, where: str, num_moe_layers: int | None, num_experts: int | None) -> None:
    """A trace replays only on a model with its MoE layers and experts (``None``: any)."""
    L, E = loads.shape[1:]
    want = (L if num_moe_layers is None else num_moe_layers, E if num_experts is None else num_experts)
    if (L, E) != want:
        raise ConfigError(f"{where}: {L} MoE layers of {E} experts; the model it is replayed on has {want[0]} of "
                          f"{want[1]}: record the trace from a model of that shape")


def stats_of(loads: np.ndarray, top_k: int, forwards: int = 1, prefix: str = "model.layers.{}.mlp.experts"
             ) -> RoutingStats:
    """Routing statistics of one iteration's (or a window's summed) ``loads[L, E]`` (no affinity)."""
    layers = [prefix.format(i) for i in range(loads.shape[0])]
    counts = {n: [int(round(v)) for v in loads[i]] for i, n in enumerate(layers)}
    return RoutingStats(layers, counts, {n: max(1, sum(counts[n]) // top_k) for n in layers},
                        {n: top_k for n in layers}, {}, forwards)


def honest_protocol(trace: np.ndarray, window: int, decide: Callable[[np.ndarray], object],
                    score: Callable[[object, np.ndarray], object], sees_current: bool = False) -> list:
    """Scores of ``decide``'s decisions, one per iteration ``i >= window``: ``decide`` gets a copy of
    ``trace[i - window:i]`` (with ``sees_current``: ``trace[i:i + 1]``, for a policy that decides on the gate
    output of the iteration itself), ``score(decision, trace[i])`` prices it on iteration ``i``."""
    out = []
    for i in range(window, len(trace)):
        seen = trace[i:i + 1] if sees_current else trace[i - window:i]
        out.append(score(decide(seen.copy()), trace[i].copy()))
    return out

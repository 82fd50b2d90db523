"""Routing statistics of a model on sample batches (``ds-hexamoe profile-routing``, plans before training)."""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..experts import (RoutingStatsCollector, attach_collector, collector_of, detach_collector, experts_modules,
                       reduce_stats, stats_delta)
from ..placement.shapes import ModelShape


def profile_routing(model, batches, max_batches: int | None = None, collector=None, after_forward=None):
    """Run ``model`` forward (no grad) over ``batches`` (dicts of tensors or ``input_ids`` tensors) with a
    collector active; returns the :class:`~ds_hexamoe.experts.RoutingStats` (with the model shape when the config
    is a transformers MoE config). Layers are named by their module path. ``after_forward(collector)`` is called
    after each forward (the per-forward trace reads the collector there)."""
    mods = experts_modules(model)
    if not mods:
        raise ConfigError("model: has no transformers experts modules; profile-routing needs an MoE model built "
                          'with @use_experts_implementation and experts_implementation="hexamoe"')
    impl = getattr(model.config, "_experts_implementation", None)
    if impl not in (None, "hexamoe"):
        raise ConfigError(f'model.experts_implementation: got {impl!r}; profile-routing needs "hexamoe" (its forward records routing)')
    previous = collector_of(model)
    if previous is not None:
        detach_collector(model, previous)
    c = attach_collector(model, collector or RoutingStatsCollector())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                c.step()
                if isinstance(batch, dict):
                    keep = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                    model(**keep)
                else:
                    model(batch)
                if after_forward is not None:
                    after_forward(c)
        c.step()
    finally:
        detach_collector(model, c)
        if previous is not None:
            attach_collector(model, previous)
        model.train(was_training)
    stats = c.snapshot()
    if not stats.layers:
        raise ConfigError("profile-routing: no routing was recorded; check that the data yields batches")
    try:
        shape = ModelShape.from_hf_config(model.config, seq_len=None)
        stats.model = shape.to_dict()
    except (ConfigError, TypeError):
        stats.model = None
    return stats


def trace_recorder(rows: list):
    """An ``after_forward`` for :func:`profile_routing` that appends each forward's routing (the collector's
    growth since the previous forward, summed over ranks) to ``rows``: the rows of a routing trace."""
    last = [None]

    def record(collector) -> None:
        now = collector.snapshot()
        rows.append(reduce_stats(stats_delta(now, last[0])))
        last[0] = now
    return record

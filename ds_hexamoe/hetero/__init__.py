"""Heterogeneous training at runtime: the plan's uneven batch shares with exact results, FSSDP shard
weights from the plan, re-planning with shard migration, and slowdown emulation (docs/placement.md)."""
from .batching import ShareSampler, count_tokens, global_token_count, loss_scale, share_bounds, split_batch
from .controller import HeteroController, model_shape_for, moe_layers, resolve_profiles
from .slowdown import CollectiveClock, active_clock

__all__ = ["ShareSampler", "split_batch", "share_bounds", "count_tokens", "loss_scale", "global_token_count",
           "HeteroController", "model_shape_for", "moe_layers", "resolve_profiles", "CollectiveClock", "active_clock"]

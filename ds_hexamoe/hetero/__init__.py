"""The runtime side of heterogeneous placement (docs/design.md, "Heterogeneous placement"): the one profile
resolution (:mod:`.resolve`), the one planning entry (:mod:`.planning`), the one owner of the current plan
and its one re-plan path (:mod:`.state`), the controller that runs plans during training (uneven batch shares with exact results, FSSDP shard weights, re-planning with shard
migration), routing profiles of a model, and slowdown emulation."""
from .batching import ShareSampler, count_tokens, global_token_count, loss_scale, share_bounds, split_batch
from .controller import HeteroController
from .planning import global_micro_batch, infer_seq_len, make_plan, model_shape_for, moe_layers, shape_for_stats
from .resolve import declared_speeds, resolve_profiles
from .slowdown import CollectiveClock, active_clock
from .state import PlanState

__all__ = ["ShareSampler", "split_batch", "share_bounds", "count_tokens", "loss_scale", "global_token_count",
           "HeteroController", "model_shape_for", "moe_layers", "resolve_profiles", "declared_speeds", "make_plan",
           "infer_seq_len", "shape_for_stats", "global_micro_batch", "PlanState", "CollectiveClock", "active_clock"]

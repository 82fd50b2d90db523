"""The experts protocol, the ``"hexamoe"`` experts forward and routing statistics (docs/design.md).

Layers above (layers, FSSDP, parallel modes, runtime, integrations) reach experts modules only through
this package: :func:`experts_modules` finds them, :func:`expert_weights` reads their weights,
:func:`state_of` holds what ds-hexamoe keeps on each, and the collector records their routing.
"""
from .collector import RoutingStatsCollector, attach_collector, collector_of, detach_collector, reduce_stats
from .forward import hexamoe_experts_forward, record_routing
from .lora import attach_lora, factors_from_peft, factors_to_peft
from .protocol import (IMPLEMENTATION, ExpertsState, default_gate, expert_weights, experts_modules, flag,
                       is_experts_module, state_of, uses_experts_interface, weight_names)
from .stats import RoutingStats, balance, layer_balance, stats_delta, synthetic_stats, uniform_stats

__all__ = [
    "IMPLEMENTATION", "ExpertsState", "RoutingStats", "RoutingStatsCollector", "attach_collector", "attach_lora",
    "balance", "factors_from_peft", "factors_to_peft",
    "collector_of", "default_gate", "detach_collector", "expert_weights", "experts_modules", "flag",
    "hexamoe_experts_forward", "is_experts_module", "layer_balance", "record_routing", "reduce_stats", "state_of",
    "stats_delta", "synthetic_stats", "uniform_stats", "uses_experts_interface", "weight_names",
]

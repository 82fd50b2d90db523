"""Heterogeneity-aware placement: device profiles, routing statistics, planner, solvers, simulator.

The planner is pure Python (numpy, scipy); torch is used only to measure devices and collect routing.
"""
from .model import MODEL_SHAPES, ModelShape
from .plan import Plan
from .planner import plan
from .profiles import GPU_TABLE, DeviceProfile, builtin_profile, gather_profiles, load_profiles, measure_profile
from .simulator import Simulation, ideal_step_time, simulate, uniform_plan
from .solvers import SOLVERS, PlacementProblem, register_solver, solve
from .stats import (RoutingStats, RoutingStatsCollector, get_collector, reduce_stats, set_collector, stats_delta,
                    synthetic_stats, uniform_stats)

__all__ = [
    "DeviceProfile", "GPU_TABLE", "builtin_profile", "load_profiles", "measure_profile", "gather_profiles",
    "RoutingStats", "RoutingStatsCollector", "get_collector", "set_collector", "synthetic_stats", "uniform_stats",
    "stats_delta", "reduce_stats",
    "ModelShape", "MODEL_SHAPES", "Plan", "plan", "SOLVERS", "PlacementProblem", "register_solver", "solve",
    "Simulation", "simulate", "uniform_plan", "ideal_step_time",
]

"""Heterogeneity-aware placement: device profiles, cost model, solvers, simulator, planner and reports.

Pure Python (numpy, scipy): no torch, so plans can be made and compared without a training stack.
Routing statistics come from :mod:`ds_hexamoe.experts.stats`; measuring devices is the runtime's job
(:mod:`ds_hexamoe.hetero.profiling`).
"""
from ..experts.stats import RoutingStats, synthetic_stats, uniform_stats
from .options import PlanOptions
from .plan import Plan
from .planner import plan
from .profiles import GPU_TABLE, DeviceProfile, builtin_profile, load_profiles
from .shapes import MODEL_SHAPES, ModelShape
from .simulator import Simulation, ideal_step_time, simulate, uniform_plan
from .problem import PlacementProblem, SolverResult
from .solvers import SOLVERS, register_solver, solve
from . import squeeze as _squeeze  # noqa: F401  (registers the "bubble_squeeze" solver)
from . import ilp as _ilp  # noqa: F401  (registers the "ilp" solver)

__all__ = [
    "DeviceProfile", "GPU_TABLE", "builtin_profile", "load_profiles", "RoutingStats", "synthetic_stats",
    "uniform_stats", "ModelShape", "MODEL_SHAPES", "Plan", "PlanOptions", "plan", "SOLVERS", "PlacementProblem", "SolverResult",
    "register_solver", "solve", "Simulation", "simulate", "uniform_plan", "ideal_step_time",
]

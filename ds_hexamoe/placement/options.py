"""The planner's options: one typed set, with its defaults in one place (:class:`PlanOptions`).

Training builds them once from the ``"hexamoe"`` config (:meth:`PlanOptions.from_config`) and hands the
same object to every plan it makes; ``ds-hexamoe plan RECIPE.json`` builds them the same way, so it
prints the plan training would make. The standalone planner (``ds-hexamoe plan --devices``, benchmarks)
starts from the defaults below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import EXEC_MODES, ConfigError, HexaMoEConfig

SHARD_BY = ("memory", "speed")
SCHEDULES = ("sync", "hecate")


@dataclass(frozen=True)
class PlanOptions:
    """How the planner plans (see :func:`ds_hexamoe.placement.planner.plan`).

    ``mode`` forces one mode for every layer ("auto": the fastest candidate, per layer); ``shard_by`` sizes
    the FSSDP shards by free memory or by expert speed within memory (:meth:`CostModel.shard_weights`);
    ``schedule``/``history`` are FSSDP's forward schedule, which the cost of data-centric layers depends
    on (:meth:`CostModel.dc_forward`); ``budget`` the ``"hecate"`` mode's Algorithm 1 budget (:mod:`.dynamic`); ``replicas`` extra expert replicas per layer for ``eplb``/``ilp``
    (None: enough for every rank to host one); ``time_limit`` bounds the ILP (seconds)."""

    solver: str = "greedy"
    mode: str = "auto"
    memory_fraction: float = 0.9  # of each device's memory the plan may use
    memory_limits_gb: list[float] | None = None  # per-rank override of usable memory
    rematerialize: bool = True
    prefetch: bool = True
    use_affinity: bool = True
    replicas: int | None = None
    time_limit: float = 10.0
    shard_by: str = "memory"
    # "sync" gathers after the router; "hecate" gathers the experts of the last ``history`` calls ahead,
    # hidden under dense compute, and calibrates the rest
    schedule: str = "sync"
    history: int = 5
    # the "hecate" mode's Algorithm 1 budget t (hexamoe.fssdp.budget): an integer, "auto" (what the ahead
    # window hides at the link's bandwidth) or None (the experts above the window's mean load)
    budget: int | str | None = None
    ranks_per_node: int | None = None  # for the "hecate" mode's topology-aware dispatch; None: one node

    @classmethod
    def from_config(cls, cfg: HexaMoEConfig) -> PlanOptions:
        """The options training plans with. The runtime applies the plan's shard weights, sized by speed
        (a slow owner makes every SparseAllGather wait); FSSDP's schedule only exists with FSSDP."""
        p = cfg.placement
        fssdp = cfg.sharding == "fssdp"
        return cls(solver=p.solver, mode=cfg.mode, rematerialize=cfg.rematerialize, prefetch=cfg.prefetch,
                   use_affinity=p.use_affinity, replicas=p.replicas or None, time_limit=p.ilp_time_limit,
                   shard_by="speed", schedule=cfg.fssdp.schedule if fssdp else cls.schedule,
                   history=cfg.fssdp.history if fssdp else cls.history,
                   budget=cfg.fssdp.budget if fssdp else cls.budget)

    def replace(self, **changes: Any) -> PlanOptions:
        """A copy with ``changes``; an unknown name is a :class:`ConfigError` naming the allowed ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"plan option {unknown[0]!r}: unknown; allowed options are {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int) -> None:
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction: got {self.memory_fraction!r}; expected a number in (0, 1]")
        if self.memory_limits_gb is not None:
            m = self.memory_limits_gb
            if len(m) != world_size or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in m):
                raise ConfigError(f"memory_limits: got {m!r}; expected {world_size} numbers > 0 (GB per rank)")
        if self.replicas is not None and (not isinstance(self.replicas, int) or self.replicas < 0):
            raise ConfigError(f"replicas: got {self.replicas!r}; expected an integer >= 0 or None (automatic)")
        if not self.time_limit > 0:
            raise ConfigError(f"time_limit: got {self.time_limit!r}; expected a number of seconds > 0")
        if self.shard_by not in SHARD_BY:
            raise ConfigError(f"shard_by: got {self.shard_by!r}; expected 'memory' or 'speed'")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: got {self.schedule!r}; expected \"sync\" or \"hecate\" (hexamoe.fssdp.schedule)")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ConfigError(f"history: got {self.history!r}; expected an integer >= 1 (hexamoe.fssdp.history)")
        n = self.ranks_per_node
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"ranks_per_node: got {n!r}; expected an integer >= 1 or None (one node)")
        b = self.budget
        if not (b is None or b == "auto" or (isinstance(b, int) and not isinstance(b, bool) and b >= 0)):
            raise ConfigError(f"budget: got {b!r}; expected an integer >= 0, \"auto\" or None (hexamoe.fssdp.budget)")
        if self.mode not in EXEC_MODES + ("auto",):
            raise ConfigError(f"mode: got {self.mode!r}; expected one of {list(EXEC_MODES) + ['auto']}")

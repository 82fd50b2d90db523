"""The :class:`Plan` a planner returns: batch shares, shard weights, per-layer placement and modes (JSON)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError


@dataclass
class Plan:
    """A heterogeneity-aware training plan for ``world_size`` ranks.

    - ``batch_shares[r]``: samples of the global batch rank ``r`` takes (integers, sum = ``global_batch``);
    - ``shard_weights[r]``: its share of every layer's FSSDP expert storage (sum 1);
    - ``modes[layer]``: ``data_centric`` / ``expert_parallel`` / ``model_centric``;
    - ``placement[layer][expert]``: ranks hosting a replica (expert-parallel), the format of
      :func:`ds_hexamoe.parallel.replicas.validate_placement`;
    - ``token_fractions[layer][expert][rank]``: the share of the expert's tokens that rank computes
      (asymmetric expert assignment; sum 1 per expert);
    - ``hidden_slices[r]``: ``[lo, hi)`` of the expert hidden dimension rank ``r`` computes in
      model-centric layers;
    - ``predicted``: the simulator's step time and per-rank busy/idle seconds, against uniform and ideal.
    """

    devices: list[str]
    global_batch: int
    seq_len: int
    batch_shares: list[int]
    shard_weights: list[float]
    layers: list[str]
    modes: dict[str, str]
    placement: dict[str, dict[int, list[int]]]
    token_fractions: dict[str, dict[int, dict[int, float]]]
    hidden_slices: list[list[int]]
    solver: str = "greedy"
    predicted: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def fractions(self, num_experts: int) -> np.ndarray:
        """``F[l, e, r]`` as an array."""
        F = np.zeros((len(self.layers), num_experts, self.world_size))
        for li, l in enumerate(self.layers):
            for e, per in self.token_fractions[l].items():
                for r, v in per.items():
                    F[li, int(e), int(r)] = v
        return F

    @staticmethod
    def tables_from(layers: list[str], F: np.ndarray) -> tuple[dict, dict]:
        placement, fractions = {}, {}
        for li, l in enumerate(layers):
            placement[l], fractions[l] = {}, {}
            for e in range(F.shape[1]):
                ranks = [int(r) for r in np.flatnonzero(F[li, e] > 1e-12)]
                placement[l][e] = ranks
                fractions[l][e] = {r: float(F[li, e, r]) for r in ranks}
        return placement, fractions

    def to_dict(self) -> dict:
        d = asdict(self)
        # JSON keys are strings; from_dict turns them back into ints
        d["placement"] = {l: {str(e): v for e, v in p.items()} for l, p in self.placement.items()}
        d["token_fractions"] = {l: {str(e): {str(r): f for r, f in per.items()} for e, per in p.items()}
                                for l, p in self.token_fractions.items()}
        d["world_size"] = self.world_size
        return d

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        if not isinstance(d, dict):
            raise ConfigError(f"plan: got {type(d).__name__}; expected a JSON object")
        d = dict(d)
        d.pop("world_size", None)
        names = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - names)
        if extra:
            raise ConfigError(f"plan.{extra[0]}: unknown key; allowed keys are {sorted(names)}")
        missing = sorted(n for n in names if n not in d and n not in ("solver", "predicted", "meta"))
        if missing:
            raise ConfigError(f"plan.{missing[0]}: missing")
        try:
            d["placement"] = {l: {int(e): [int(r) for r in v] for e, v in p.items()} for l, p in d["placement"].items()}
            d["token_fractions"] = {l: {int(e): {int(r): float(f) for r, f in per.items()} for e, per in p.items()}
                                    for l, p in d["token_fractions"].items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"plan.placement / plan.token_fractions: malformed ({e}); expected layer -> expert -> ranks") from None
        plan = cls(**d)
        R = plan.world_size
        if len(plan.batch_shares) != R or sum(plan.batch_shares) != plan.global_batch:
            raise ConfigError(f"plan.batch_shares: got {plan.batch_shares}; expected {R} integers summing to "
                              f"global_batch ({plan.global_batch})")
        return plan

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> Plan:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"plan file {path!r}: does not exist; create one with `ds-hexamoe plan`")
        with open(path) as fh:
            try:
                return cls.from_dict(json.load(fh))
            except json.JSONDecodeError as e:
                raise ConfigError(f"plan file {path!r}: invalid JSON ({e})") from None

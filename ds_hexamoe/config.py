"""The ``"hexamoe"`` section of a DeepSpeed JSON config, as typed and validated dataclasses.

Every key is checked before any work starts: an unknown key or a bad value raises
:class:`ConfigError` naming the dotted key, what was given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .devices import DeviceProfile
from .errors import ConfigError
from .jsonfile import read_json


# how an MoE layer runs (docs/design.md, "Execution modes"); "auto" lets the planner choose per layer
MODES = ("data_centric", "expert_parallel", "model_centric")  # modes with a placement a plan fixes
EXEC_MODES = MODES + ("hecate",)  # every mode an FSSDP layer runs in, and the planner chooses between


@dataclass
class RouterConfig:
    """Router settings. ``top_k``, ``score_func``, ``norm_topk_prob`` and ``jitter`` shape the MoE blocks that
    ds-hexamoe builds itself (Swin-MoE, converted layers); ``aux_loss_coef``, ``z_loss_coef``,
    ``bias_update_rate`` and ``freeze`` also control a Hugging Face checkpoint's routers
    (:mod:`ds_hexamoe.integrations.router_control`)."""

    top_k: int = 2
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    # null: the model's own (a checkpoint's router_aux_loss_coef; DEFAULT_AUX_COEF for blocks built here)
    aux_loss_coef: float | None = None
    z_loss_coef: float = 0.0
    # aux-loss-free balancing (DeepSeek-V3): per-expert bias added for selection only, nudged by this rate
    bias_update_rate: float = 0.0
    jitter: float = 0.0
    freeze: bool = False  # router weights get no gradient and no optimizer state

    DEFAULT_AUX_COEF = 0.01  # class constant, not a key

    def validate(self, path: str) -> None:
        _check(self.top_k >= 1, f"{path}.top_k", self.top_k, "an integer >= 1")
        _check(self.aux_loss_coef is None or self.aux_loss_coef >= 0, f"{path}.aux_loss_coef", self.aux_loss_coef,
               "a number >= 0 (0: off) or null (the model's own)")
        for name in ("z_loss_coef", "bias_update_rate", "jitter"):
            _check(getattr(self, name) >= 0, f"{path}.{name}", getattr(self, name), "a number >= 0")

    @property
    def aux_coef(self) -> float:
        """The auxiliary-loss coefficient of a block built here (null: :attr:`DEFAULT_AUX_COEF`)."""
        return self.DEFAULT_AUX_COEF if self.aux_loss_coef is None else self.aux_loss_coef


@dataclass
class PlacementConfig:
    solver: Literal["greedy", "waterfill", "bubble_squeeze", "asym_ea", "eplb", "ilp"] = "greedy"  # greedy: old name of waterfill
    replicas: int = 0  # extra replicas of hot experts per layer
    ilp_time_limit: float = 10.0
    replan_every: int = 0  # 0: plan once
    use_affinity: bool = True

    def validate(self, path: str) -> None:
        if self.solver == "asym_ea":  # renamed: the colocated heuristic was not HeterMoE's Asym-EA
            raise ConfigError(f"{path}.solver: 'asym_ea' was renamed 'bubble_squeeze' (a colocated expert-parallel "
                              "heuristic); HeterMoE's Asym-EA places experts for zebra disaggregation (hexamoe.zebra, "
                              "the planner's verdict) and is no placement.solver")
        _check(self.replicas >= 0, f"{path}.replicas", self.replicas, "an integer >= 0")
        _check(self.ilp_time_limit > 0, f"{path}.ilp_time_limit", self.ilp_time_limit, "a number > 0")
        _check(self.replan_every >= 0, f"{path}.replan_every", self.replan_every, "an integer >= 0")


@dataclass
class LSHConfig:
    enabled: bool = False
    num_hashes: int = 2
    num_rotations: int = 1
    residual: bool = True
    seed: int = 0
    # hash only the first ``hash_dim`` rotated coordinates: fewer buckets, more compression; null: all of d
    hash_dim: int | None = None
    # run an exact pass without gradients to log the relative output error (costs one extra expert pass)
    measure_error: bool = False

    def validate(self, path: str) -> None:
        _check(self.hash_dim is None or self.hash_dim >= 1, f"{path}.hash_dim", self.hash_dim, "an integer >= 1 or null")
        _check(self.num_hashes >= 1, f"{path}.num_hashes", self.num_hashes, "an integer >= 1")
        _check(self.num_rotations >= 1, f"{path}.num_rotations", self.num_rotations, "an integer >= 1")


@dataclass
class FSSDPConfig:
    """FSSDP scheduling (docs/fssdp.md, "Scheduling"): ``"hecate"`` gathers each layer's predicted experts
    before its router runs (history of the last ``history`` calls) and fetches the rest by a calibration
    gather; ``"sync"`` gathers after the router, as before. ``fanout``: how an expert reaches many ranks."""

    schedule: Literal["hecate", "sync"] = "hecate"
    history: int = 5  # calls of a layer in the sliding load window
    # per rank and layer, at most this many non-owned experts are gathered ahead (null: every expert in the
    # window; "auto": as many as the compute between issue and use hides at the measured link bandwidth)
    budget: int | str | None = None
    reshard_every: int = 100  # optimizer steps between load-aware re-ownerships; 0: never
    # "direct": owner -> every user in one all_to_all; "tree": broadcast/reduce trees (binomial doubling);
    # "auto": a tree for an exchange in which some expert goes to >= 3 ranks
    fanout: Literal["direct", "tree", "auto"] = "auto"

    def validate(self, path: str) -> None:
        _check(self.history >= 1, f"{path}.history", self.history, "an integer >= 1")
        _check(self.budget is None or self.budget == "auto" or (isinstance(self.budget, int) and self.budget >= 0),
               f"{path}.budget", self.budget, 'an integer >= 0, "auto" or null')
        _check(self.reshard_every >= 0, f"{path}.reshard_every", self.reshard_every, "an integer >= 0")


@dataclass
class ZebraConfig:
    """Attention/expert disaggregation with the zebra pipeline in ``ds-hexamoe train`` (docs/modes.md, "Zebra").

    ``enabled``: true runs it; ``"auto"`` runs it when the planner's simulator says it beats the best
    colocated plan (needs device profiles). The split (``attention_ranks``, their ``shares`` of each global
    micro-batch, ``expert_owner`` per expert, or one such list per MoE layer as HeterMoE's Asym-EA places
    them) is the planner's unless all three are given."""

    enabled: bool | str = False
    attention_ranks: list[int] | None = None
    shares: list[int] | None = None
    expert_owner: list[int | list[int]] | None = None  # flat: every layer alike; lists: one per MoE layer
    micro_batches: int | None = None  # null: the planner's (2 with an explicit split)

    def validate(self, path: str) -> None:
        _check(self.enabled in (True, False, "auto"), f"{path}.enabled", self.enabled, 'true, false or "auto"')
        given = [k for k in ("attention_ranks", "shares", "expert_owner") if getattr(self, k) is not None]
        _check(len(given) in (0, 3), f"{path}.{given[0] if given else 'attention_ranks'}", "only " + ", ".join(given),
               "all three of attention_ranks, shares and expert_owner, or none (the planner's split)")
        rows = [isinstance(o, list) for o in self.expert_owner or []]
        _check(all(rows) or not any(rows), f"{path}.expert_owner", self.expert_owner,
               "one rank per expert (every layer alike) or one such list per MoE layer, not both mixed")
        _check(self.micro_batches is None or (isinstance(self.micro_batches, int) and self.micro_batches >= 1),
               f"{path}.micro_batches", self.micro_batches, "an integer >= 1 or null")

    @property
    def explicit(self) -> bool:
        return self.attention_ranks is not None


@dataclass
class HexaMoEConfig:
    """Typed form of ``config["hexamoe"]``."""

    enabled: bool = True
    kernels: Literal["auto", "torch", "triton"] = "auto"
    sharding: Literal["none", "fssdp"] = "none"
    mode: Literal["data_centric", "expert_parallel", "model_centric", "hecate", "auto"] = "data_centric"
    # per-rank FSSDP shard weights (uneven shards); null: even, or the planner's when profiles are set
    shard_weights: list[float] | None = None
    rematerialize: bool = True
    prefetch: bool = True
    profile: Literal["uniform", "measure", "declared"] = "uniform"
    # declared entries (ds_hexamoe.devices: numbers left out are None until resolved or measured)
    devices: list[DeviceProfile] | None = None
    devices_file: str | None = None
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    lsh: LSHConfig = field(default_factory=LSHConfig)
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    zebra: ZebraConfig = field(default_factory=ZebraConfig)
    collect_stats: bool = True
    stats_path: str | None = None
    log_every: int = 10

    def validate(self, path: str = "hexamoe") -> None:
        if self.shard_weights is not None:
            _check(len(self.shard_weights) > 0 and all(0 <= w < float("inf") for w in self.shard_weights)
                   and sum(self.shard_weights) > 0,
                   f"{path}.shard_weights", self.shard_weights, "a non-empty list of finite numbers >= 0 with a positive sum")
        if self.profile == "declared":
            _check(self.devices is not None or self.devices_file is not None, f"{path}.devices", None,
                   'a list of device profiles (or "devices_file") when "profile" is "declared"')
        if self.devices_file is not None:
            _check(os.path.exists(self.devices_file), f"{path}.devices_file", self.devices_file, "an existing JSON file")
        if self.lsh.enabled:
            _check(self.mode in ("expert_parallel", "auto"), f"{path}.lsh.enabled", True,
                   'false unless "mode" is "expert_parallel" or "auto" (LSH compresses the expert-parallel all-to-all)')
        _check(self.log_every >= 1, f"{path}.log_every", self.log_every, "an integer >= 1")
        if self.zebra.enabled is not False:
            _check(self.sharding == "none", f"{path}.sharding", self.sharding,
                   '"none" with zebra (expert ranks hold whole experts; attention ranks the dense part)')
            _check(self.zebra.explicit or self.profile != "uniform", f"{path}.zebra.enabled", self.zebra.enabled,
                   'false, or device profiles ("profile": "declared"/"measure") for the planner to split the ranks, '
                   "or an explicit split (zebra.attention_ranks, shares, expert_owner)")
        if self.mode != "data_centric":
            _check(self.sharding == "fssdp", f"{path}.sharding", self.sharding,
                   f'"fssdp" when "mode" is {self.mode!r} (experts are materialized from FSSDP shards)')
        if self.mode == "hecate":
            _check(self.profile == "uniform", f"{path}.profile", self.profile,
                   '"uniform" with "mode": "hecate" (it places experts itself every iteration; with device profiles '
                   'use "mode": "auto", whose planner puts a layer in the "hecate" mode where it predicts it fastest)')

    @property
    def replans_fssdp(self) -> bool:
        """FSSDP re-plans modes and replicas without device profiles: ``"mode": "auto"``, or expert parallel
        with ``placement.replicas`` (:meth:`ds_hexamoe.hetero.state.PlanState.replan`)."""
        return self.sharding == "fssdp" and (
            self.mode == "auto" or (self.mode == "expert_parallel" and self.placement.replicas > 0))

    @classmethod
    def from_dict(cls, data: dict | None, path: str = "hexamoe") -> HexaMoEConfig:
        return _build(cls, {} if data is None else data, path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; expected {allowed}")


class ConfigErrors(ConfigError):
    """Several independent configuration errors found in one pass; ``problems`` holds each message."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Collector:
    """Runs independent checks past their errors, then raises them all at once (:meth:`raise_all`)."""

    def __init__(self):
        self.errors: list[ConfigError] = []
        self.add = self.errors.append

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None after keeping its :class:`ConfigError`."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            self.errors.append(e)
            return None

    def raise_all(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors([p for e in self.errors for p in getattr(e, "problems", [str(e)])])


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: got {type(data).__name__} {data!r}; expected a JSON object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    found = Collector()
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.add(ConfigError(f"{path}.{key}: unknown key{hint}; allowed keys are {sorted(fields)}"))
        else:
            kwargs[key] = found.run(_coerce, hints[key], value, f"{path}.{key}")
    found.raise_all()  # the object's own checks read every field, so they wait for good fields
    obj = cls(**kwargs)
    obj.validate(path)
    return obj


def _coerce(tp, value: Any, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors, arms = [], [a for a in args if a is not type(None)]
        if isinstance(value, list):  # a list's error is a list arm's (the element that is wrong)
            arms.sort(key=lambda a: typing.get_origin(a) is not list)
        for arg in arms:
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: got {value!r}; allowed values are {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: got {value!r}; expected a list")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is DeviceProfile:  # the one device type parses its own JSON keys (tflops, memory_gb shorthands)
        return DeviceProfile.from_dict(value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: got {value!r}; expected a string")
        return value
    return value


def load_ds_config(config: str | os.PathLike | dict | None) -> dict:
    """A DeepSpeed config given as a dict or a JSON path, as a dict (a missing file is a clear error)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    return read_json(config, "deepspeed config", "pass an existing JSON file or a dict")


def hexamoe_section(ds_config: dict) -> HexaMoEConfig | None:
    """The parsed ``"hexamoe"`` section of a DeepSpeed config dict, or None when absent."""
    if "hexamoe" not in ds_config:
        return None
    return HexaMoEConfig.from_dict(ds_config["hexamoe"])

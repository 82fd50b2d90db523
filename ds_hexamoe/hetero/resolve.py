"""The one profile resolution: a :class:`~ds_hexamoe.placement.DeviceProfile` per rank from the config.

``hexamoe.profile`` "declared" reads ``devices``/``devices_file``, "measure" times every rank (a
collective), "uniform" gives the planner something to plan with when it is asked to (docs/design.md,
"Heterogeneous placement").
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError, HexaMoEConfig
from ..distributed import dist_on
from ..placement.profiles import DeviceProfile, load_profiles
from ..placement.shapes import ModelShape
from .profiling import gather_profiles, measure_latency, measure_profile, measure_shape_for


def _declared_source(cfg: HexaMoEConfig) -> tuple[Any, str]:
    if cfg.devices_file is not None:
        return os.fspath(cfg.devices_file), f"hexamoe.devices_file ({cfg.devices_file})"
    return list(cfg.devices), "hexamoe.devices"


def load_declared(cfg: HexaMoEConfig, world: int) -> list[DeviceProfile]:
    src, where = _declared_source(cfg)
    try:
        profiles = load_profiles(src)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"hexamoe.{msg}" if msg.startswith("devices") and where == "hexamoe.devices"
                          else f"{where}: {msg}") from None
    if len(profiles) != world:
        raise ConfigError(f"{where}: got {len(profiles)} device profiles for WORLD_SIZE={world}; give one entry per "
                          'rank (or entries with "count" in a devices_file) adding up to the number of ranks')
    return profiles


def _measure_local(cfg: HexaMoEConfig, rank: int, world: int, shape: ModelShape | None = None,
                   micro_tokens: int | None = None) -> DeviceProfile:
    """This rank's measured profile; a ``devices`` entry for the rank overrides measured numbers it sets.

    With the job's ``shape`` (and ``micro_tokens`` per rank and micro-batch) the kernels are timed at its
    sizes, capped by :func:`~.profiling.measure_shape_for` (the name records both); else at
    :func:`~.profiling.measure_profile`'s defaults."""
    override = None
    if cfg.devices is not None:
        if len(cfg.devices) not in (1, world):
            raise ConfigError(f"hexamoe.devices: got {len(cfg.devices)} entries for WORLD_SIZE={world} with "
                              '"profile": "measure"; give one entry (all ranks) or one per rank, or none')
        override = cfg.devices[rank if len(cfg.devices) == world else 0]
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    at = measure_shape_for(shape, micro_tokens, dev.type) if shape is not None else None
    prof = measure_profile(dev, slowdown=override.slowdown if override is not None else 1.0, at=at)
    if dev.type == "cpu":  # ranks on one host share its memory
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        prof.memory_bytes = int(prof.memory_bytes // max(1, local_world))
    if override is not None:
        if override.attn_tflops is not None:
            prof.attn_tflops = override.attn_tflops
        if override.expert_tflops is not None:
            prof.expert_tflops = override.expert_tflops
        if override.memory_bytes is not None:
            prof.memory_bytes = override.memory_bytes
        if override.bandwidth_gbps is not None:
            prof.bandwidth_gbps = override.bandwidth_gbps
        if override.step_overhead_s:
            prof.step_overhead_s = override.step_overhead_s
        if override.memory_bandwidth_gbps is not None:
            prof.memory_bandwidth_gbps = override.memory_bandwidth_gbps
        if override.sdpa_tflops is not None:
            prof.sdpa_tflops = override.sdpa_tflops
        prof.expert_slowdown = override.expert_slowdown
        if override.name != "cpu":
            prof.name = override.name
    return prof


def resolve_profiles(cfg: HexaMoEConfig, world: int, rank: int, group=None, shape: ModelShape | None = None,
                     micro_tokens: int | None = None) -> list[DeviceProfile]:
    """One profile per rank for ``hexamoe.profile`` (a collective for "measure").

    "declared": the ``devices``/``devices_file`` entries, one per rank; "measure": every rank times itself
    at the job's ``shape`` and ``micro_tokens`` (see :func:`_measure_local`), declared values win;
    "uniform": see :func:`_uniform_profiles`."""
    if cfg.profile == "declared":
        return load_declared(cfg, world)
    if cfg.profile == "measure":
        local = _measure_local(cfg, rank, world, shape, micro_tokens)
        if dist_on() and world > 1:  # every rank measures (a collective), a declared value then wins
            dev = "cuda" if torch.cuda.is_available() and dist.get_backend(group) == "nccl" else "cpu"
            local.latency_us = measure_latency(group, device=dev)
        declared = cfg.devices[rank if len(cfg.devices) == world else 0].latency_us if cfg.devices else None
        if declared is not None:
            local.latency_us = declared
        return gather_profiles(local, group=group)
    return _uniform_profiles(cfg, world)


def _uniform_profiles(cfg: HexaMoEConfig, world: int) -> list[DeviceProfile]:
    """Profiles for planning a ``"profile": "uniform"`` job (mode "auto", or replicas): declared entries when
    given, else this host measured once and used for every rank (no collective)."""
    if cfg.devices_file is not None or cfg.devices:
        return load_profiles(_declared_source(cfg)[0])
    return [measure_profile("cpu" if not torch.cuda.is_available() else "cuda", tokens=256, hidden=128, ffn=256)] * world


def declared_speeds(cfg: HexaMoEConfig, world: int) -> list[float] | None:
    """Model-centric slice speeds from declared devices (``tflops / slowdown``), else None (equal slices)."""
    devs = cfg.devices
    if not devs or len(devs) != world or any(d.tflops is None for d in devs):
        return None
    return [d.tflops / d.slowdown for d in devs]

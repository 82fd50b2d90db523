"""Device profiles for the planner: one :class:`DeviceProfile` per rank, from a table name or JSON.

The type, its JSON keys and the datasheet table live in the ground layer (:mod:`ds_hexamoe.devices`),
so ``hexamoe.devices`` and a devices file parse alike; measuring a device is the runtime's job
(:mod:`ds_hexamoe.hetero.profiling`). Only ratios between ranks matter to the batch split and the
expert assignment; absolute numbers matter to the predicted step time and to the data-centric /
model-centric choice (FLOPs against bytes) (docs/design.md, "Heterogeneous placement").
"""
from __future__ import annotations

import json
import os

from ..devices import GB, GPU_TABLE, DeviceProfile, GPUSpec, lookup_gpu
from ..config import ConfigError
from ..jsonfile import read_json


def builtin_profile(name: str, *, slowdown: float = 1.0) -> DeviceProfile:
    """The profile of a table GPU (same TFLOP/s for attention- and expert-like shapes)."""
    key = lookup_gpu(name)
    if key is None:
        raise ConfigError(f"device {name!r}: not in the built-in table; known devices are {sorted(GPU_TABLE)}")
    s = GPU_TABLE[key]
    return DeviceProfile(key, s.tflops, s.tflops, int(s.memory_gb * GB), s.bandwidth_gbps, slowdown,
                         latency_us=s.latency_us, memory_bandwidth_gbps=s.memory_bandwidth_gbps,
                         sdpa_tflops=s.sdpa_tflops or None)


def load_profiles(source: str | os.PathLike | list | dict) -> list[DeviceProfile]:
    """Profiles, one per rank, from a JSON file, a ``{"devices": [...]}`` dict or a list.

    A list entry is a table name (``"H100"``), a :class:`DeviceProfile` (a ``hexamoe.devices`` entry) or an
    object with ``name``, ``tflops`` (or ``attn_tflops`` and ``expert_tflops``), ``memory_gb``,
    ``bandwidth_gbps``, optional ``slowdown``, ``step_overhead_s``, ``latency_us``, ``memory_bandwidth_gbps``
    and ``count`` (that many ranks alike). A known name fills
    missing numbers; otherwise every number is required. Errors name the entry and the field.
    """
    where = "devices"
    if isinstance(source, (str, os.PathLike)):
        source = read_json(source, "devices file", "pass a JSON file "
                           '{"devices": [{"name": ..., "tflops": ..., "memory_gb": ..., "bandwidth_gbps": ...}]}')
    if isinstance(source, dict):
        if "devices" not in source:
            raise ConfigError(f'{where}: missing; expected a JSON object with a "devices" list')
        extra = [k for k in source if k != "devices"]
        if extra:
            raise ConfigError(f'{extra[0]}: unknown key; a devices file holds only "devices"')
        source = source["devices"]
    if not isinstance(source, list) or not source:
        raise ConfigError(f"{where}: got {source!r}; expected a non-empty list of device profiles")
    out: list[DeviceProfile] = []
    for i, entry in enumerate(source):
        declared = DeviceProfile.from_entry(entry, f"{where}[{i}]")
        check_world_size(len(out) + declared.count, f"{where}[{i}].count")
        out.extend([declared.resolve(f"{where}[{i}]")] * declared.count)
    return out


# the planner's per-rank tables (the ideal bound's LP, the simulator's clocks, the solvers' loops) grow
# with the rank count: past this, a plan takes minutes and memory grows without bound
MAX_RANKS = 8192


def check_world_size(n: int, field: str = "devices") -> None:
    """Raise before any work when ``n`` ranks are more than the planner handles."""
    if n > MAX_RANKS:
        raise ConfigError(f"{field}: {n} ranks in all; the planner handles at most {MAX_RANKS}; plan a "
                          f"representative group of at most {MAX_RANKS} ranks (a plan's shares repeat per group)")


def save_profiles(profiles: list[DeviceProfile], path: str | os.PathLike) -> None:
    """Write profiles in the format :func:`load_profiles` reads (exact numbers, one entry per rank)."""
    devices = [{"name": p.name, "attn_tflops": p.attn_tflops, "expert_tflops": p.expert_tflops,
                "memory_bytes": p.memory_bytes, "bandwidth_gbps": p.bandwidth_gbps, "slowdown": p.slowdown,
                "step_overhead_s": p.step_overhead_s, "latency_us": p.latency_us,
                "memory_bandwidth_gbps": p.memory_bandwidth_gbps, "sdpa_tflops": p.sdpa_tflops,
                "expert_slowdown": p.expert_slowdown}
               for p in profiles]
    with open(path, "w") as fh:
        json.dump({"devices": devices}, fh, indent=2)


__all__ = ["DeviceProfile", "GB", "GPUSpec", "GPU_TABLE", "MAX_RANKS", "builtin_profile", "check_world_size",
           "load_profiles", "lookup_gpu", "save_profiles"]

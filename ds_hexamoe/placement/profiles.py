"""Device profiles: how fast, how big and how well connected each rank is.

A :class:`DeviceProfile` per rank is the planner's view of the hardware. It comes from a built-in table
of common accelerators (peak dense bf16 tensor TFLOP/s, memory, per-direction interconnect bandwidth),
from a declared JSON file (``{"devices": [...]}``, a name from the table fills missing numbers), or from
:func:`measure_profile`, a short matmul micro-benchmark (works on CPU).

Only ratios between ranks matter to the batch split and the expert assignment; absolute numbers matter
to the predicted step time and to the data-centric / model-centric choice (FLOPs against bytes).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..config import ConfigError, DeviceSpec

GB = 1e9  # memory and bandwidth use decimal units (vendor datasheets); memory_bytes is exact bytes


@dataclass
class DeviceProfile:
    """One rank's capabilities.

    ``attn_tflops``: dense matmul TFLOP/s on attention-like shapes (large square GEMMs);
    ``expert_tflops``: on expert-like shapes (many skinny per-expert GEMMs); ``bandwidth_gbps``: GB/s
    per direction on the rank's link to its peers; ``slowdown`` >= 1 divides both speeds (a busy or
    throttled GPU, or an emulated slow rank); ``latency_us``: the fixed cost of one collective on that
    link (launch and synchronization; small messages pay only this), not scaled by ``slowdown``;
    ``memory_bandwidth_gbps``: device memory GB/s, which memory-bound work runs at (the optimizer step
    over the rank's FSSDP shard), divided by ``slowdown``; 0: not modelled.
    """

    name: str
    attn_tflops: float
    expert_tflops: float
    memory_bytes: int
    bandwidth_gbps: float
    slowdown: float = 1.0
    # seconds per optimizer step that do not scale with the batch (optimizer step, framework overhead),
    # at full speed; a slow rank pays it ``slowdown`` times
    step_overhead_s: float = 0.0
    latency_us: float = 0.0
    memory_bandwidth_gbps: float = 0.0

    def __post_init__(self):
        self.validate("profile")

    def validate(self, path: str) -> None:
        for f in ("attn_tflops", "expert_tflops", "bandwidth_gbps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{path}.{f}: got {v!r}; expected a number > 0")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, (int, float)) or not self.memory_bytes > 0:
            raise ConfigError(f"{path}.memory_bytes: got {self.memory_bytes!r}; expected a number > 0")
        if isinstance(self.slowdown, bool) or not isinstance(self.slowdown, (int, float)) or not self.slowdown >= 1:
            raise ConfigError(f"{path}.slowdown: got {self.slowdown!r}; expected a number >= 1")
        v = self.step_overhead_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"{path}.step_overhead_s: got {v!r}; expected a number >= 0 (seconds per step)")
        v = self.latency_us
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"{path}.latency_us: got {v!r}; expected a number >= 0 (microseconds per collective)")
        v = self.memory_bandwidth_gbps
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"{path}.memory_bandwidth_gbps: got {v!r}; expected a number >= 0 (GB/s; 0: not modelled)")

    # effective rates in base units, slowdown applied: what the cost model uses
    @property
    def attn_flops(self) -> float:
        return self.attn_tflops * 1e12 / self.slowdown

    @property
    def expert_flops(self) -> float:
        return self.expert_tflops * 1e12 / self.slowdown

    @property
    def step_overhead(self) -> float:
        return self.step_overhead_s * self.slowdown

    @property
    def memory_bandwidth(self) -> float:
        """Bytes per second of memory-bound work, slowdown applied (0.0: not modelled)."""
        return self.memory_bandwidth_gbps * GB / self.slowdown

    @property
    def latency(self) -> float:
        return self.latency_us * 1e-6

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbps * GB

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path: str = "profile") -> DeviceProfile:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: unknown key; allowed keys are {sorted(known)}")
        optional = {"slowdown": 1.0, "step_overhead_s": 0.0, "latency_us": 0.0, "memory_bandwidth_gbps": 0.0}
        missing = [f.name for f in fields(cls) if f.name not in d and f.name not in optional]
        if missing:
            raise ConfigError(f"{path}.{missing[0]}: missing; every profile needs {sorted(known - set(optional))}")
        p = cls.__new__(cls)
        for k, v in {**optional, **d}.items():
            setattr(p, k, v)
        p.validate(path)
        return p


@dataclass(frozen=True)
class GPUSpec:
    """A datasheet row: peak dense tensor TFLOP/s in bf16 (fp16 where bf16 is absent), memory, link GB/s,
    memory GB/s."""

    tflops: float
    memory_gb: float
    bandwidth_gbps: float
    note: str = ""
    memory_bandwidth_gbps: float = 0.0

    @property
    def latency_us(self) -> float:
        """A small-message collective's cost, typical of NCCL: ~10 us over NVLink/Infinity Fabric, ~20 us
        over PCIe (host-staged)."""
        return 20.0 if "PCIe" in self.note else 10.0


# Peak dense (no sparsity) tensor-core TFLOP/s, bf16 unless noted; bandwidth is per direction on the
# usual interconnect of the part (NVLink for SXM/OAM modules, PCIe for PCIe cards); last, the datasheet
# memory bandwidth (HBM/GDDR) in GB/s.
GPU_TABLE: dict[str, GPUSpec] = {
    "B200": GPUSpec(2250.0, 180.0, 900.0, "NVLink 5", 8000.0),
    "H200": GPUSpec(989.0, 141.0, 450.0, "SXM, NVLink 4", 4800.0),
    "H100-SXM": GPUSpec(989.0, 80.0, 450.0, "NVLink 4", 3350.0),
    "H100-PCIe": GPUSpec(756.0, 80.0, 64.0, "PCIe 5", 2000.0),
    "GH200": GPUSpec(989.0, 96.0, 450.0, "NVLink 4", 4000.0),
    "MI300X": GPUSpec(1307.0, 192.0, 448.0, "Infinity Fabric", 5300.0),
    "MI250X": GPUSpec(383.0, 128.0, 200.0, "Infinity Fabric", 3277.0),
    "A100-80GB": GPUSpec(312.0, 80.0, 300.0, "SXM, NVLink 3", 2039.0),
    "A100-40GB": GPUSpec(312.0, 40.0, 300.0, "SXM, NVLink 3", 1555.0),
    "A100-PCIe": GPUSpec(312.0, 80.0, 32.0, "PCIe 4", 1935.0),
    "L40S": GPUSpec(362.0, 48.0, 32.0, "PCIe 4", 864.0),
    "L40": GPUSpec(181.0, 48.0, 32.0, "PCIe 4", 864.0),
    "A40": GPUSpec(150.0, 48.0, 32.0, "PCIe 4", 696.0),
    "A10": GPUSpec(125.0, 24.0, 32.0, "PCIe 4", 600.0),
    "L4": GPUSpec(121.0, 24.0, 32.0, "PCIe 4", 300.0),
    "RTX-4090": GPUSpec(165.0, 24.0, 32.0, "PCIe 4; fp32 accumulate", 1008.0),
    "RTX-3090": GPUSpec(71.0, 24.0, 32.0, "PCIe 4; fp32 accumulate", 936.0),
    "RTX-A6000": GPUSpec(155.0, 48.0, 32.0, "PCIe 4", 768.0),
    "V100-32GB": GPUSpec(125.0, 32.0, 150.0, "SXM2, NVLink 2; fp16 (no bf16)", 900.0),
    "V100-16GB": GPUSpec(125.0, 16.0, 150.0, "SXM2, NVLink 2; fp16 (no bf16)", 900.0),
    "T4": GPUSpec(65.0, 16.0, 16.0, "PCIe 3; fp16 (no bf16)", 320.0),
}
_ALIASES = {"H100": "H100-SXM", "A100": "A100-80GB", "V100": "V100-32GB", "4090": "RTX-4090", "3090": "RTX-3090",
            "A6000": "RTX-A6000", "MI300": "MI300X"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP = {_norm(k): k for k in GPU_TABLE} | {_norm(a): k for a, k in _ALIASES.items()}


def lookup_gpu(name: str) -> str | None:
    """The table key for ``name`` (case, dashes and spaces ignored; ``"NVIDIA H100 80GB HBM3"`` works
    through the longest table key contained in it), or None."""
    n = _norm(name)
    if n in _LOOKUP:
        return _LOOKUP[n]
    # device strings from torch.cuda.get_device_name: pick the longest table name they contain
    hits = [k for k in _LOOKUP if k and k in n and len(k) >= 3]
    return _LOOKUP[max(hits, key=len)] if hits else None


def builtin_profile(name: str, *, slowdown: float = 1.0) -> DeviceProfile:
    """The profile of a table GPU (same TFLOP/s for attention- and expert-like shapes)."""
    key = lookup_gpu(name)
    if key is None:
        raise ConfigError(f"device {name!r}: not in the built-in table; known devices are {sorted(GPU_TABLE)}")
    s = GPU_TABLE[key]
    return DeviceProfile(key, s.tflops, s.tflops, int(s.memory_gb * GB), s.bandwidth_gbps, slowdown,
                         latency_us=s.latency_us, memory_bandwidth_gbps=s.memory_bandwidth_gbps)


# ------------------------------------------------------------------------------------------- loading
_ENTRY_KEYS = ("name", "tflops", "attn_tflops", "expert_tflops", "memory_gb", "memory_bytes", "bandwidth_gbps",
               "slowdown", "step_overhead_s", "latency_us", "memory_bandwidth_gbps", "count")


def _num(d: dict, key: str, path: str, low: float = 0.0, strict: bool = True) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v > low if strict else v >= low)
    if not ok:
        raise ConfigError(f"{path}.{key}: got {v!r}; expected a number {'>' if strict else '>='} {low:g}")
    return float(v)


def _entry_to_profiles(entry: Any, path: str) -> list[DeviceProfile]:
    if isinstance(entry, DeviceProfile):
        return [entry]
    if isinstance(entry, DeviceSpec):
        entry = asdict(entry)
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: got {entry!r}; expected a device object such as "
                          '{"name": "A100-40GB", "tflops": 312, "memory_gb": 40, "bandwidth_gbps": 300}')
    unknown = [k for k in entry if k not in _ENTRY_KEYS]
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key; allowed keys are {list(_ENTRY_KEYS)}")
    name = entry.get("name", "device")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}.name: got {name!r}; expected a device name string")
    tflops = _num(entry, "tflops", path)
    attn = _num(entry, "attn_tflops", path)
    expert = _num(entry, "expert_tflops", path)
    mem_gb = _num(entry, "memory_gb", path)
    mem_b = _num(entry, "memory_bytes", path)
    bw = _num(entry, "bandwidth_gbps", path)
    slowdown = _num(entry, "slowdown", path, 1.0, strict=False)
    overhead = _num(entry, "step_overhead_s", path, 0.0, strict=False)
    latency = _num(entry, "latency_us", path, 0.0, strict=False)
    mem_bw = _num(entry, "memory_bandwidth_gbps", path, 0.0, strict=False)
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{path}.count: got {count!r}; expected an integer >= 1 (ranks with this profile)")
    key = lookup_gpu(name)
    spec = GPU_TABLE[key] if key else None

    def need(value, key_name, table_value):
        if value is not None:
            return value
        if spec is not None:
            return table_value
        raise ConfigError(f"{path}.{key_name}: missing, and {name!r} is not in the built-in table; give a number > 0 "
                          f"or use a known name ({', '.join(sorted(GPU_TABLE))})")

    base = tflops if tflops is not None else (None if (attn is not None and expert is not None) else
                                              need(None, "tflops", spec.tflops if spec else None))
    attn = attn if attn is not None else base
    expert = expert if expert is not None else base
    memory = mem_b if mem_b is not None else (mem_gb * GB if mem_gb is not None else
                                             need(None, "memory_gb", spec.memory_gb * GB if spec else None))
    bw = need(bw, "bandwidth_gbps", spec.bandwidth_gbps if spec else None)
    # a known part's typical values; unknown devices: not modelled unless declared
    if latency is None:
        latency = spec.latency_us if spec is not None else 0.0
    if mem_bw is None:
        mem_bw = spec.memory_bandwidth_gbps if spec is not None else 0.0
    prof = DeviceProfile(key or name, attn, expert, int(memory), bw, 1.0 if slowdown is None else slowdown,
                         0.0 if overhead is None else overhead, latency, mem_bw)
    return [prof] * count


def load_profiles(source: str | os.PathLike | list | dict) -> list[DeviceProfile]:
    """Profiles, one per rank, from a JSON file, a ``{"devices": [...]}`` dict or a list.

    A list entry is a table name (``"H100"``), a :class:`DeviceProfile`, a config ``DeviceSpec`` or an
    object with ``name``, ``tflops`` (or ``attn_tflops`` and ``expert_tflops``), ``memory_gb``,
    ``bandwidth_gbps``, optional ``slowdown``, ``step_overhead_s``, ``latency_us``, ``memory_bandwidth_gbps``
    and ``count`` (that many ranks alike). A known name fills
    missing numbers; otherwise every number is required. Errors name the entry and the field.
    """
    where = "devices"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"devices file {path!r}: does not exist; pass a JSON file "
                              '{"devices": [{"name": ..., "tflops": ..., "memory_gb": ..., "bandwidth_gbps": ...}]}')
        with open(path) as fh:
            try:
                source = json.load(fh)
            except json.JSONDecodeError as e:
                raise ConfigError(f"devices file {path!r}: invalid JSON ({e})") from None
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
        out.extend(_entry_to_profiles(entry, f"{where}[{i}]"))
    return out


def save_profiles(profiles: list[DeviceProfile], path: str | os.PathLike) -> None:
    """Write profiles in the format :func:`load_profiles` reads (exact numbers, one entry per rank)."""
    devices = [{"name": p.name, "attn_tflops": p.attn_tflops, "expert_tflops": p.expert_tflops,
                "memory_bytes": p.memory_bytes, "bandwidth_gbps": p.bandwidth_gbps, "slowdown": p.slowdown,
                "step_overhead_s": p.step_overhead_s, "latency_us": p.latency_us,
                "memory_bandwidth_gbps": p.memory_bandwidth_gbps}
               for p in profiles]
    with open(path, "w") as fh:
        json.dump({"devices": devices}, fh, indent=2)


# ------------------------------------------------------------------------------------------ measuring
def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return int(16 * GB)


def _time(fn, sync, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_profile(
    device: Any = "cpu",
    *,
    dtype: Any = None,
    tokens: int = 1024,
    hidden: int = 512,
    ffn: int = 1024,
    num_experts: int = 8,
    top_k: int = 2,
    repeats: int = 3,
    bandwidth_gbps: float | None = None,
    slowdown: float = 1.0,
    name: str | None = None,
) -> DeviceProfile:
    """Time attention-like and expert-like matmuls on ``device`` and return its profile.

    Attention-like: the fused QKV projection ``[T, d] @ [d, 3d]`` (one large GEMM). Expert-like: one
    ``[T*k/E, d] @ [d, f]`` GEMM per expert, as a batched matmul (the skinny per-expert shape). Memory
    bandwidth: a large tensor copy (bytes read plus written).
    Best of ``repeats`` timings (the minimum is the least noisy estimate of capability). Memory is the
    device's total memory (host RAM for CPU). Bandwidth is not measured (it needs a peer): pass it, or
    it comes from the built-in table by device name, else 16 GB/s (a PCIe 3 x16 guess, flagged in the name).
    ``slowdown`` is recorded, not applied to the timings.
    """
    import torch

    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dev.type == "cuda":
        sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
        memory = torch.cuda.get_device_properties(dev).total_memory
        dev_name = torch.cuda.get_device_name(dev)
    else:
        sync = lambda: None  # noqa: E731
        memory = _host_memory_bytes()
        dev_name = dev.type
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dev, dtype)
    w_qkv = torch.randn(hidden, 3 * hidden, generator=gen).to(dev, dtype)
    per = max(1, tokens * top_k // num_experts)
    xe = torch.randn(num_experts, per, hidden, generator=gen).to(dev, dtype)
    we = torch.randn(num_experts, hidden, ffn, generator=gen).to(dev, dtype)
    big = torch.empty(64 << 20 if dev.type == "cuda" else 16 << 20, device=dev)  # 256 / 64 MB of fp32
    big_out = torch.empty_like(big)
    with torch.no_grad():
        t_attn = _time(lambda: x @ w_qkv, sync, repeats)
        t_exp = _time(lambda: torch.bmm(xe, we), sync, repeats)
        t_copy = _time(lambda: big_out.copy_(big), sync, repeats)
    mem_bw = 2.0 * big.numel() * big.element_size() / t_copy / GB  # read + write
    attn = 2.0 * tokens * hidden * 3 * hidden / t_attn / 1e12
    expert = 2.0 * num_experts * per * hidden * ffn / t_exp / 1e12
    key = lookup_gpu(dev_name) if dev.type == "cuda" else None
    if bandwidth_gbps is None:
        bandwidth_gbps = GPU_TABLE[key].bandwidth_gbps if key else 16.0
    label = name or (key or dev_name)
    latency = GPU_TABLE[key].latency_us if key else 0.0  # needs a peer: see measure_latency
    return DeviceProfile(label, attn, expert, int(memory), float(bandwidth_gbps), float(slowdown), latency_us=latency,
                         memory_bandwidth_gbps=mem_bw)


def measure_latency(group=None, repeats: int = 20, device: Any = "cpu") -> float:
    """Microseconds one tiny ``all_reduce`` takes on ``group`` (median of ``repeats`` after a warm-up): the
    per-collective cost the cost model charges every collective of a step. A collective: every rank
    calls it. 0.0 without torch.distributed or with one rank."""
    import statistics

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return 0.0
    t = torch.zeros(1, device=device)
    sync = (lambda: torch.cuda.synchronize(t.device)) if t.device.type == "cuda" else (lambda: None)
    dist.all_reduce(t, group=group)
    sync()
    dist.barrier(group=group)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(t, group=group)
        sync()
        times.append(time.perf_counter() - t0)
    # every rank adopts the slowest rank's median: a collective costs what its slowest member sees
    m = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return float(m) * 1e6


def gather_profiles(local: DeviceProfile, group=None) -> list[DeviceProfile]:
    """Every rank's profile, in rank order (``all_gather_object``); ``[local]`` without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, local.to_dict(), group=group)
    return [DeviceProfile.from_dict(d, f"rank{i}") for i, d in enumerate(out)]

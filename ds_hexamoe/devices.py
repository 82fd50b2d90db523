"""Devices: the one device type, :class:`DeviceProfile`, and the datasheet table that fills it in.

An entry of ``hexamoe.devices``, of a devices file and of the planner's per-rank list is the same type
(docs/design.md, "Heterogeneous placement"). As declared (:meth:`DeviceProfile.from_entry`), numbers the
entry leaves out are None: a known name fills them from :data:`GPU_TABLE` (:meth:`DeviceProfile.resolve`),
or the runtime measures them. The JSON keys ``tflops`` (attention and expert speed alike) and ``memory_gb``
are shorthands for ``attn_tflops``/``expert_tflops`` and ``memory_bytes``. It is in the ground layer
because the ``hexamoe`` section is validated, devices included, before any work.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import ConfigError

GB = 1e9  # memory and bandwidth use decimal units (vendor datasheets); memory_bytes is exact bytes


@dataclass(frozen=True)
class GPUSpec:
    """A datasheet row: peak dense tensor TFLOP/s in bf16 (fp16 where bf16 is absent), memory, link GB/s,
    memory GB/s."""

    tflops: float
    memory_gb: float
    bandwidth_gbps: float
    note: str = ""
    memory_bandwidth_gbps: float = 0.0
    sdpa_tflops: float = 0.0  # attention kernel (QK^T, softmax, PV; fwd + bwd) at long sequences; 0: = tflops
    collective_latency_us: float = 0.0  # measured small-collective cost; 0: the NCCL estimate below

    @property
    def latency_us(self) -> float:
        """A small-message collective's cost: as measured where the row says, else typical of NCCL: ~10 us
        over NVLink/Infinity Fabric, ~20 us over PCIe (host-staged)."""
        if self.collective_latency_us > 0:
            return self.collective_latency_us
        return 20.0 if "PCIe" in self.note else 10.0


# Peak dense (no sparsity) tensor-core TFLOP/s, bf16 unless noted; bandwidth is per direction on the
# usual interconnect of the part (NVLink for SXM/OAM modules, PCIe for PCIe cards); last, the datasheet
# memory bandwidth (HBM/GDDR) in GB/s; where known, the attention kernel's TFLOP/s at long sequences
# (>= 2K tokens, head dim 128, fwd + bwd): H100 and A100 as FlashAttention-2 reports them (Dao 2023:
# ~335 and ~200), A40 at ~60% of its fp32-accumulate tensor peak (FlashAttention-2 on GA102), V100 (no
# FlashAttention-2 on Volta: PyTorch's memory-efficient kernel) at A40 / 3.7, HeterMoE's measured
# A40/V100 attention ratio. Estimates: measure (`measure_profile`) where it matters.
GPU_TABLE: dict[str, GPUSpec] = {
    "B200": GPUSpec(2250.0, 180.0, 900.0, "NVLink 5", 8000.0),
    "H200": GPUSpec(989.0, 141.0, 450.0, "SXM, NVLink 4", 4800.0),
    "H100-SXM": GPUSpec(989.0, 80.0, 450.0, "NVLink 4", 3350.0, 335.0),
    "H100-PCIe": GPUSpec(756.0, 80.0, 64.0, "PCIe 5", 2000.0, 260.0),
    "GH200": GPUSpec(989.0, 96.0, 450.0, "NVLink 4", 4000.0),
    "MI300X": GPUSpec(1307.0, 192.0, 448.0, "Infinity Fabric", 5300.0),
    "MI250X": GPUSpec(383.0, 128.0, 200.0, "Infinity Fabric", 3277.0),
    "A100-80GB": GPUSpec(312.0, 80.0, 300.0, "SXM, NVLink 3", 2039.0, 200.0),
    "A100-40GB": GPUSpec(312.0, 40.0, 300.0, "SXM, NVLink 3", 1555.0, 200.0),
    "A100-PCIe": GPUSpec(312.0, 80.0, 32.0, "PCIe 4", 1935.0, 200.0),
    "L40S": GPUSpec(362.0, 48.0, 32.0, "PCIe 4", 864.0),
    "L40": GPUSpec(181.0, 48.0, 32.0, "PCIe 4", 864.0),
    "A40": GPUSpec(150.0, 48.0, 32.0, "PCIe 4", 696.0, 45.0),
    "A10": GPUSpec(125.0, 24.0, 32.0, "PCIe 4", 600.0),
    "L4": GPUSpec(121.0, 24.0, 32.0, "PCIe 4", 300.0),
    "RTX-4090": GPUSpec(165.0, 24.0, 32.0, "PCIe 4; fp32 accumulate", 1008.0),
    "RTX-3090": GPUSpec(71.0, 24.0, 32.0, "PCIe 4; fp32 accumulate", 936.0),
    "RTX-A6000": GPUSpec(155.0, 48.0, 32.0, "PCIe 4", 768.0),
    "V100-32GB": GPUSpec(125.0, 32.0, 150.0, "SXM2, NVLink 2; fp16 (no bf16)", 900.0, 12.2),
    "V100-16GB": GPUSpec(125.0, 16.0, 150.0, "SXM2, NVLink 2; fp16 (no bf16)", 900.0, 12.2),
    "T4": GPUSpec(65.0, 16.0, 16.0, "PCIe 3; fp16 (no bf16)", 320.0),
    # not a GPU: one rank of a 2-core, 24 GB x86 host running two gloo ranks (the project's test machine), so
    # CPU recipes can be planned with "profile": "declared". fp32 GEMM rates from measure_profile (0.023
    # attention / 0.030 expert TFLOP/s with the cores oversubscribed ~4x; rounded up for an idle host), half
    # the host's memory, measure_profile's host-link figure and a tiny all_reduce between the two ranks
    # (~150 us under that load). Estimates: "profile": "measure" times the host itself.
    "cpu": GPUSpec(0.05, 12.0, 16.0, "2-core host, gloo loopback; fp32", 11.0, 0.04, collective_latency_us=100.0),
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


# the JSON keys of an entry, in the order errors list them
ENTRY_KEYS = ("name", "tflops", "attn_tflops", "expert_tflops", "memory_gb", "memory_bytes", "bandwidth_gbps",
              "slowdown", "step_overhead_s", "latency_us", "memory_bandwidth_gbps", "count", "sdpa_tflops",
              "expert_slowdown")
# field -> (lowest value, whether the bound is strict, what the number means); None: not declared
_BOUNDS = {
    "attn_tflops": (0.0, True, ""), "expert_tflops": (0.0, True, ""), "memory_bytes": (0.0, True, ""),
    "bandwidth_gbps": (0.0, True, ""), "slowdown": (1.0, False, ""),
    "step_overhead_s": (0.0, False, " (seconds per step)"),
    "latency_us": (0.0, False, " (microseconds per collective)"),
    "memory_bandwidth_gbps": (0.0, False, " (GB/s; 0: not modelled)"),
    "sdpa_tflops": (0.0, True, " (TFLOP/s of the attention kernel)"),
    "expert_slowdown": (1.0, False, " (divides expert speed instead of slowdown)"),
}


def _bad_number(v: Any, low: float, strict: bool) -> bool:
    return (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            or not (v > low if strict else v >= low))


def _expected(v: Any, low: float, strict: bool) -> str:
    finite = "finite " if isinstance(v, float) and not math.isfinite(v) else ""  # inf passes a plain >= check
    return f"expected a {finite}number {'>' if strict else '>='} {low:g}"


def _num(d: dict, key: str, path: str, low: float = 0.0, strict: bool = True) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if _bad_number(v, low, strict):
        raise ConfigError(f"{path}.{key}: got {v!r}; {_expected(v, low, strict)}")
    return float(v)


@dataclass
class DeviceProfile:
    """One device: how fast, how big and how well connected a rank is.

    ``attn_tflops``: dense matmul TFLOP/s on attention-like shapes (large square GEMMs);
    ``expert_tflops``: on expert-like shapes (many skinny per-expert GEMMs); ``bandwidth_gbps``: GB/s
    per direction on the rank's link to its peers; ``slowdown`` >= 1 divides both speeds (a busy or
    throttled GPU, or an emulated slow rank); ``step_overhead_s``: seconds per optimizer step that do not
    scale with the batch, at full speed (a slow rank pays it ``slowdown`` times); ``latency_us``: the
    fixed cost of one collective on that link, not scaled by ``slowdown``; ``memory_bandwidth_gbps``:
    device memory GB/s, which memory-bound work runs at (the optimizer step over the rank's FSSDP shard),
    divided by ``slowdown``, 0: not modelled; ``count``: how many consecutive ranks a declared entry
    describes; ``sdpa_tflops``: the attention kernel's TFLOP/s (QK^T, softmax, PV), which the quadratic
    part of attention runs at (None: the table's figure, else ``attn_tflops``); ``expert_slowdown``:
    divides expert speed instead of ``slowdown`` (a device slow at attention but not at experts: a V100
    beside an A40). A number that is None was not declared (see :meth:`resolve`).
    """

    name: str = "cpu"
    attn_tflops: float | None = None
    expert_tflops: float | None = None
    memory_bytes: int | None = None
    bandwidth_gbps: float | None = None
    slowdown: float = 1.0
    step_overhead_s: float = 0.0
    latency_us: float | None = 0.0
    memory_bandwidth_gbps: float | None = 0.0
    count: int = 1
    sdpa_tflops: float | None = None
    expert_slowdown: float | None = None

    def __post_init__(self):
        self.validate("profile")

    def validate(self, path: str) -> None:
        for f, (low, strict, note) in _BOUNDS.items():
            v = getattr(self, f)
            if v is None and f not in ("slowdown", "step_overhead_s"):
                continue
            if _bad_number(v, low, strict):
                raise ConfigError(f"{path}.{f}: got {v!r}; {_expected(v, low, strict)}{note}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"{path}.count: got {self.count!r}; expected an integer >= 1 (ranks with this profile)")

    # effective rates in base units, slowdown applied: what the cost model uses (on a resolved profile)
    @property
    def attn_flops(self) -> float:
        return self.attn_tflops * 1e12 / self.slowdown

    @property
    def expert_flops(self) -> float:
        return self.expert_tflops * 1e12 / (self.slowdown if self.expert_slowdown is None else self.expert_slowdown)

    @property
    def sdpa_flops(self) -> float:
        """The attention kernel's rate (the quadratic part of attention), slowdown applied."""
        return (self.sdpa_tflops or self.attn_tflops) * 1e12 / self.slowdown

    @property
    def step_overhead(self) -> float:
        return self.step_overhead_s * self.slowdown

    @property
    def memory_bandwidth(self) -> float:
        """Bytes per second of memory-bound work, slowdown applied (0.0: not modelled)."""
        return (self.memory_bandwidth_gbps or 0.0) * GB / self.slowdown

    @property
    def latency(self) -> float:
        return (self.latency_us or 0.0) * 1e-6

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbps * GB

    # the JSON shorthands, read back
    @property
    def memory_gb(self) -> float | None:
        return None if self.memory_bytes is None else self.memory_bytes / GB

    @property
    def tflops(self) -> float | None:
        """The one TFLOP/s of attention and expert shapes alike (the ``tflops`` key); None when they differ."""
        return self.expert_tflops if self.attn_tflops == self.expert_tflops else None

    @property
    def resolved(self) -> bool:
        return None not in (self.attn_tflops, self.expert_tflops, self.memory_bytes, self.bandwidth_gbps,
                            self.latency_us, self.memory_bandwidth_gbps)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["count"] == 1:  # a per-rank profile
            del d["count"]
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "profile") -> DeviceProfile:
        """A declared entry (the JSON keys of :data:`ENTRY_KEYS`); a missing name is ``"cpu"``."""
        return cls.from_entry(d, path, default_name="cpu")

    @classmethod
    def from_entry(cls, entry: Any, path: str, default_name: str = "device") -> DeviceProfile:
        """Parse one entry: a table name, a :class:`DeviceProfile` or an object with the keys of
        :data:`ENTRY_KEYS`; errors name ``path`` and the field."""
        if isinstance(entry, cls):
            return entry
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: got {entry!r}; expected a device object such as "
                              '{"name": "A100-40GB", "tflops": 312, "memory_gb": 40, "bandwidth_gbps": 300}')
        unknown = [k for k in entry if k not in ENTRY_KEYS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], ENTRY_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{unknown[0]}: unknown key{hint}; allowed keys are {list(ENTRY_KEYS)}")
        name = entry.get("name", default_name)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}.name: got {name!r}; expected a device name string")
        tflops = _num(entry, "tflops", path)
        attn, expert = _num(entry, "attn_tflops", path), _num(entry, "expert_tflops", path)
        mem_gb, mem_b = _num(entry, "memory_gb", path), _num(entry, "memory_bytes", path)
        bw = _num(entry, "bandwidth_gbps", path)
        slowdown = _num(entry, "slowdown", path, 1.0, strict=False)
        overhead = _num(entry, "step_overhead_s", path, 0.0, strict=False)
        latency = _num(entry, "latency_us", path, 0.0, strict=False)
        mem_bw = _num(entry, "memory_bandwidth_gbps", path, 0.0, strict=False)
        sdpa = _num(entry, "sdpa_tflops", path)
        expert_slowdown = _num(entry, "expert_slowdown", path, 1.0, strict=False)
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{path}.count: got {count!r}; expected an integer >= 1 (ranks with this profile)")
        memory = mem_b if mem_b is not None else (None if mem_gb is None else mem_gb * GB)
        return cls(name, tflops if attn is None else attn, tflops if expert is None else expert,
                   None if memory is None else int(memory), bw, 1.0 if slowdown is None else slowdown,
                   0.0 if overhead is None else overhead, latency, mem_bw, count, sdpa, expert_slowdown)

    def resolve(self, path: str = "profile") -> DeviceProfile:
        """One rank's profile with every number set: a known name (then the table's key) fills what was
        not declared; for an unknown name the speeds, memory and link bandwidth are required and the
        latency and memory bandwidth are 0 (not modelled). ``self`` when nothing changes."""
        key = lookup_gpu(self.name)
        spec = GPU_TABLE[key] if key else None

        def need(value, key_name, table_value):
            if value is not None:
                return value
            if spec is not None:
                return table_value
            raise ConfigError(f"{path}.{key_name}: missing, and {self.name!r} is not in the built-in table; give a "
                              f"number > 0 or use a known name ({', '.join(sorted(GPU_TABLE))})")

        attn, expert = self.attn_tflops, self.expert_tflops
        if attn is None or expert is None:
            base = need(None, "tflops", spec.tflops if spec else None)
            attn, expert = (base if attn is None else attn), (base if expert is None else expert)
        memory = need(self.memory_bytes, "memory_gb", int(spec.memory_gb * GB) if spec else None)
        bw = need(self.bandwidth_gbps, "bandwidth_gbps", spec.bandwidth_gbps if spec else None)
        # a known part's typical values; unknown devices: not modelled unless declared
        latency = self.latency_us if self.latency_us is not None else (spec.latency_us if spec else 0.0)
        mem_bw = self.memory_bandwidth_gbps if self.memory_bandwidth_gbps is not None else (
            spec.memory_bandwidth_gbps if spec else 0.0)
        sdpa = self.sdpa_tflops if self.sdpa_tflops is not None else (
            spec.sdpa_tflops if spec is not None and spec.sdpa_tflops > 0 and self.attn_tflops is None else None)
        out = replace(self, name=key or self.name, attn_tflops=attn, expert_tflops=expert, memory_bytes=int(memory),
                      bandwidth_gbps=bw, latency_us=latency, memory_bandwidth_gbps=mem_bw, count=1, sdpa_tflops=sdpa)
        return self if out == self else out


__all__ = ["DeviceProfile", "ENTRY_KEYS", "GB", "GPUSpec", "GPU_TABLE", "lookup_gpu"]

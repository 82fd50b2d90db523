"""Measuring devices: a rank's :class:`~ds_hexamoe.devices.DeviceProfile` from a short micro-benchmark,
the per-collective latency of a group, and every rank's profile gathered (docs/design.md,
"Heterogeneous placement"). The planner (:mod:`ds_hexamoe.placement`) stays free of torch; this is the
runtime side.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..distributed import dist_on
from ..devices import GB, GPU_TABLE, DeviceProfile, lookup_gpu

if TYPE_CHECKING:
    from ..placement.shapes import ModelShape


def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return int(16 * GB)


_SAMPLE_S = 0.02  # a timed sample lasts at least this long: small kernels run back to back


def _run(fn, sync, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return time.perf_counter() - t0


def _time(fn, sync, repeats: int) -> float:
    """Seconds per call: the best of ``repeats`` samples of ``n`` back-to-back calls, ``n`` grown until a
    sample lasts ``_SAMPLE_S`` (a job's small kernels would otherwise time the timer and the scheduler:
    one call on a busy 2-core host ranged from 0.1 to 16 ms)."""
    fn()  # warm-up: allocation, kernel selection
    sync()
    n, dt = 1, _run(fn, sync, 1)
    while dt < _SAMPLE_S and n < 4096:
        n = min(4096, n * max(2, min(16, int(_SAMPLE_S / max(dt, 1e-6)))))
        dt = _run(fn, sync, n)
    best = dt / n
    for _ in range(repeats - 1):
        best = min(best, _run(fn, sync, n) / n)
    return best


# One timed kernel call's FLOPs, most and least, and its weight elements at most, by device type. At the
# most, a measurement at Mixtral sizes takes about a second on a 2-core CPU (~40-60 GFLOP/s) and a GPU's is
# nearly uncapped; at the least, a small model's kernels are timed with more rows (or sequences), so the
# rate is the device's at that layer size rather than its per-call overhead and the scheduler's noise.
_BUDGET = {"cpu": (2e9, 2e7, 1 << 24), "cuda": (2e11, 1e10, 1 << 28)}
_ROWS = 256  # GEMM rows kept before anything else: a skinnier GEMM runs well below the device's rate
_MIN_COLS = 128
_SDPA_BUDGETS = 3  # attention carries the sequence-length effect: one head's long sequence may cost 3


@dataclass(frozen=True)
class MeasureShape:
    """The kernels :func:`measure_profile` times: the QKV projection ``[tokens, hidden] @ [hidden,
    qkv_cols]``, ``experts`` expert GEMMs ``[rows, hidden] @ [hidden, ffn]`` (one batched matmul) and causal
    attention over ``seqs`` sequences of ``seq_len`` tokens with ``heads`` heads of ``head_dim``. ``note``:
    the job's shape and the sizes timed instead of the job's, which the measured profile's name carries."""

    tokens: int
    hidden: int
    qkv_cols: int
    experts: int
    rows: int
    ffn: int
    seq_len: int
    seqs: int
    heads: int
    head_dim: int
    note: str = ""

    @classmethod
    def plain(cls, tokens: int, hidden: int, ffn: int, num_experts: int, top_k: int, seq_len: int | None,
              num_heads: int) -> "MeasureShape":
        """``tokens`` tokens through one layer as given, uncapped (one sequence of all tokens by default)."""
        S = min(seq_len or tokens, tokens)
        return cls(tokens, hidden, 3 * hidden, num_experts, max(1, tokens * top_k // num_experts), ffn, S,
                   max(1, tokens // S), num_heads, max(1, hidden // num_heads))


def measure_shape_for(shape: ModelShape, micro_tokens: int | None = None, device_type: str = "cpu") -> MeasureShape:
    """What to time for a job of :class:`~ds_hexamoe.placement.ModelShape` ``shape`` with ``micro_tokens``
    tokens per rank and micro-batch (default: one sequence), capped to the device type's budget.

    Caps keep what sets a kernel's rate: the hidden size, the head dimension, the sequence length
    (attention's quadratic part, up to the score matrix's memory) and at least 256 GEMM rows; output
    columns, experts, heads and sequences shrink first. Below the least work per call, rows and
    sequences grow instead. Every size timed other than the job's is listed in ``note`` as
    ``timed <field>=<value>``."""
    d, f, E, k, S = shape.hidden, shape.expert_ffn, shape.num_experts, shape.top_k, shape.seq_len
    H, hd = shape.num_heads, shape.hd
    T = max(S, int(micro_tokens or S))
    flops, least, elems = _BUDGET["cuda" if device_type == "cuda" else "cpu"]
    timed: list[str] = []

    def fit(field: str, job: int, low: float, high: float) -> int:
        n = max(1, int(min(max(job, low), high)))
        if n != job:
            timed.append(f"{field}={n}")
        return n

    # a GEMM keeps the hidden size and its rows (up to _ROWS); its output columns, then experts, shrink
    tokens = fit("tokens", T, least / (6 * d * d), max(_ROWS, flops / (6 * d * d)))
    qkv_cols = fit("qkv_cols", 3 * d, 0, max(_MIN_COLS, min(elems // d, flops / (2 * d * tokens))))
    rows = fit("rows", max(1, T * k // E), least / (2 * d * f * E), max(_ROWS, flops / (2 * d * f)))
    ffn = fit("ffn", f, 0, max(_MIN_COLS, min(elems // d, flops / (2 * d * rows))))
    experts = fit("experts", E, 0, min(elems // (d * ffn), flops / (2 * d * ffn * rows)))
    # one head of one sequence (2 S^2 hd FLOPs) may take _SDPA_BUDGETS; more heads or sequences one budget
    seq = fit("seq", S, 0, min(_SDPA_BUDGETS * flops / (2 * hd), elems) ** 0.5)  # elems: a math kernel's scores
    one = 2.0 * seq ** 2 * hd
    heads = fit("heads", H, 0, flops / one)
    seqs = fit("seqs", max(1, T // S), least / (one * heads), flops / (one * heads))
    note = f"hidden={d} ffn={f} experts={E} top_k={k} heads={H} seq={S} tokens={T}"
    if timed:
        note += "; timed " + " ".join(timed)
    return MeasureShape(tokens, d, qkv_cols, experts, rows, ffn, seq, seqs, heads, hd, note)


def measured_at(name: str) -> dict[str, int]:
    """The job shape (and ``timed_*`` caps) a measured profile's name records, e.g. ``{"seq": 4096, ...}``."""
    m = re.search(r"\[(.*)\]\s*$", name)
    if not m:
        return {}
    job, _, timed = m.group(1).partition("; timed ")
    out = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", job)}
    out.update({f"timed_{k}": int(v) for k, v in re.findall(r"(\w+)=(\d+)", timed)})
    return out


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
    seq_len: int | None = None,
    num_heads: int = 8,
    at: MeasureShape | None = None,
) -> DeviceProfile:
    """Time attention-like and expert-like matmuls on ``device`` and return its profile.

    Attention-like: the fused QKV projection ``[T, d] @ [d, 3d]`` (one large GEMM). Attention kernel:
    causal ``scaled_dot_product_attention`` over ``tokens / seq_len`` sequences of ``seq_len`` tokens
    (default: one of ``tokens``) with ``num_heads`` heads of ``d / num_heads``, counted as ``2 S^2 d``
    FLOPs per sequence (QK^T and PV, causal half): its rate falls at short sequences. Expert-like: one
    ``[T*k/E, d] @ [d, f]`` GEMM per expert, as a batched matmul (the skinny per-expert shape). Memory
    bandwidth: a large tensor copy (bytes read plus written). ``at`` (a job's shapes from
    :func:`measure_shape_for`) replaces the shape arguments, and its note goes into the name.
    Best of ``repeats`` timings (the minimum is the least noisy estimate of capability). Memory is the
    device's total memory (host RAM for CPU). Bandwidth is not measured (it needs a peer): pass it, or
    it comes from the built-in table by device name, else 16 GB/s (a PCIe 3 x16 guess, flagged in the name).
    ``slowdown`` is recorded, not applied to the timings.
    """
    import torch

    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    at = at or MeasureShape.plain(tokens, hidden, ffn, num_experts, top_k, seq_len, num_heads)
    if dev.type == "cuda":
        memory = torch.cuda.get_device_properties(dev).total_memory
        dev_name = torch.cuda.get_device_name(dev)
    else:
        memory = _host_memory_bytes()
        dev_name = dev.type
    attn, expert, sdpa_tflops, mem_bw = _time_kernels(dev, dtype, at, repeats)
    key = lookup_gpu(dev_name) if dev.type == "cuda" else None
    if bandwidth_gbps is None:
        bandwidth_gbps = GPU_TABLE[key].bandwidth_gbps if key else 16.0
    label = name or (key or dev_name)
    if at.note and lookup_gpu(f"{label} [{at.note}]") == lookup_gpu(label):  # the note must not rename the part
        label = f"{label} [{at.note}]"
    latency = GPU_TABLE[key].latency_us if key else 0.0  # needs a peer: see measure_latency
    return DeviceProfile(label, attn, expert, int(memory), float(bandwidth_gbps), float(slowdown), latency_us=latency,
                         memory_bandwidth_gbps=mem_bw, sdpa_tflops=sdpa_tflops)


def _time_kernels(dev, dtype, at: MeasureShape, repeats: int) -> tuple[float, float, float, float]:
    """TFLOP/s of the QKV projection, the expert GEMMs and the attention kernel, and copy GB/s."""
    import torch

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def weight(*size):  # a constant fill: the values do not change a GEMM's speed, randn of GBs would take seconds
        return torch.full(size, 0.01, device=dev, dtype=dtype)

    x = torch.randn(at.tokens, at.hidden, generator=gen).to(dev, dtype)
    w_qkv = weight(at.hidden, at.qkv_cols)
    xe = torch.randn(at.experts, at.rows, at.hidden, generator=gen).to(dev, dtype)
    we = weight(at.experts, at.hidden, at.ffn)
    big = torch.empty(64 << 20 if dev.type == "cuda" else 16 << 20, device=dev)  # 256 / 64 MB of fp32
    big_out = torch.empty_like(big)
    q, k, v = (torch.randn(at.seqs, at.heads, at.seq_len, at.head_dim, generator=gen).to(dev, dtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        t_sdpa = _time(lambda: sdpa(q, k, v, is_causal=True), sync, repeats)
        t_attn = _time(lambda: x @ w_qkv, sync, repeats)
        t_exp = _time(lambda: torch.bmm(xe, we), sync, repeats)
        t_copy = _time(lambda: big_out.copy_(big), sync, repeats)
    mem_bw = 2.0 * big.numel() * big.element_size() / t_copy / GB  # read + write
    attn = 2.0 * at.tokens * at.hidden * at.qkv_cols / t_attn / 1e12
    expert = 2.0 * at.experts * at.rows * at.hidden * at.ffn / t_exp / 1e12
    sdpa_tflops = 2.0 * at.seqs * at.seq_len ** 2 * at.heads * at.head_dim / t_sdpa / 1e12
    return attn, expert, sdpa_tflops, mem_bw


def measure_latency(group=None, repeats: int = 20, device: Any = "cpu") -> float:
    """Microseconds one tiny ``all_reduce`` takes on ``group`` (median of ``repeats`` after a warm-up): the
    per-collective cost the cost model charges every collective of a step. A collective: every rank
    calls it. 0.0 without torch.distributed or with one rank."""
    import statistics

    import torch
    import torch.distributed as dist

    if not dist_on() or dist.get_world_size(group) < 2:
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

    if not dist_on():
        return [local]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, local.to_dict(), group=group)
    return [DeviceProfile.from_dict(d, f"rank{i}") for i, d in enumerate(out)]

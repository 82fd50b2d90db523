"""Measuring devices: a rank's :class:`~ds_hexamoe.devices.DeviceProfile` from a short micro-benchmark,
the per-collective latency of a group, and every rank's profile gathered (docs/design.md,
"Heterogeneous placement"). The planner (:mod:`ds_hexamoe.placement`) stays free of torch; this is the
runtime side.
"""
from __future__ import annotations

import os
import time
from typing import Any

from ..devices import GB, GPU_TABLE, DeviceProfile, lookup_gpu


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
    seq_len: int | None = None,
    num_heads: int = 8,
) -> DeviceProfile:
    """Time attention-like and expert-like matmuls on ``device`` and return its profile.

    Attention-like: the fused QKV projection ``[T, d] @ [d, 3d]`` (one large GEMM). Attention kernel:
    causal ``scaled_dot_product_attention`` over ``tokens / seq_len`` sequences of ``seq_len`` tokens
    (default: one of ``tokens``) with ``num_heads`` heads of ``d / num_heads``, counted as ``2 S^2 d``
    FLOPs per sequence (QK^T and PV, causal half): its rate falls at short sequences. Expert-like: one
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
    S = min(seq_len or tokens, tokens)
    nseq, hd = max(1, tokens // S), max(1, hidden // num_heads)
    q, k, v = (torch.randn(nseq, num_heads, S, hd, generator=gen).to(dev, dtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        t_sdpa = _time(lambda: sdpa(q, k, v, is_causal=True), sync, repeats)
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
    sdpa_tflops = 2.0 * nseq * S * S * num_heads * hd / t_sdpa / 1e12
    return DeviceProfile(label, attn, expert, int(memory), float(bandwidth_gbps), float(slowdown), latency_us=latency,
                         memory_bandwidth_gbps=mem_bw, sdpa_tflops=sdpa_tflops)


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

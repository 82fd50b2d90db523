"""Tile configurations for the expert-specific kernels.

Per-architecture lists for ``triton.autotune`` (keyed on ``N``, ``K``; Triton adds the argument dtypes to
the key), and one small fixed config for ``TRITON_INTERPRET=1`` so CPU tests do not autotune.
``BLOCK_M`` is the row tile of ESMM (tiles never straddle two experts) and the row chunk of the
ESTMM/ESS reductions.
"""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# The interpreter pays per program and per op, not per FLOP: few programs, but BLOCK_M small enough that
# test segments span several row tiles (HEXA-MoE's chunk-loop bug needs > 1 chunk).
INTERPRET_MM = [_cfg(16, 32, 32, 4, 1)]
INTERPRET_SUM = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]

# Hopper (sm90): 228 KiB shared memory; large tiles, deep pipelines.
SM90_MM = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 32, 4, 5),
    _cfg(64, 64, 64, 4, 4),
]
# Ampere (sm80/sm86/sm89): 164 KiB (sm80) or ~100 KiB (sm86/89) shared memory; shallower pipelines.
SM80_MM = [
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(64, 64, 32, 2, 4),
]
# ESTMM: BLOCK_M is the reduction chunk, (BLOCK_K, BLOCK_N) the output tile of dW[e].
SM90_TMM = [
    _cfg(64, 128, 128, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(32, 128, 128, 8, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(128, 64, 64, 4, 3),
]
SM80_TMM = [
    _cfg(32, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 128, 64, 8, 3),
]
GPU_SUM = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((64, 128, 4, 2), (128, 64, 4, 2), (32, 256, 4, 2), (128, 128, 8, 2))
]


def configs(kind: str, capability: tuple[int, int] | None) -> list[triton.Config]:
    """Config list for ``kind`` in ``{"mm", "tmm", "sum"}`` on a device of ``capability`` (None: interpreter)."""
    if kind not in ("mm", "tmm", "sum"):
        raise ValueError(f"kind must be 'mm', 'tmm' or 'sum', got {kind!r}")
    if capability is None or interpreting():
        return INTERPRET_SUM if kind == "sum" else INTERPRET_MM
    if kind == "sum":
        return GPU_SUM
    hopper = capability[0] >= 9
    if kind == "mm":
        return SM90_MM if hopper else SM80_MM
    return SM90_TMM if hopper else SM80_TMM


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def prune(configs_: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles much wider than the problem (fine-grained experts have small ``N``/``K``)."""
    n_cap, k_cap = _pow2_at_least_16(named_args["N"]), _pow2_at_least_16(named_args.get("K", 1))
    kept = [c for c in configs_ if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs.get("BLOCK_K", 0) <= k_cap]
    return kept or configs_[-1:]

"""Tile configurations for the expert-specific kernels.

Per-architecture lists for ``triton.autotune`` (keyed on ``N``, ``K``; Triton adds the argument dtypes to
the key), pruned per call to tiles that fit the problem and the GPU's shared memory, and one small fixed
config for ``TRITON_INTERPRET=1`` so CPU tests do not autotune.
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


# Each launched kernel's config kind and autotune key (``tests/test_triton_compile.py`` compiles them all).
TUNING = {"esmm": ("mm", ["N", "K"]), "estmm": ("tmm", ["N", "K"]), "ess": ("sum", ["N"])}


def configs(kind: str, capability: tuple[int, int] | None) -> list[triton.Config]:
    """Config list for ``kind`` in ``{"mm", "tmm", "sum"}`` on a device of ``capability`` (None: interpreter)."""
    if capability is None or interpreting():
        _check_kind(kind)
        return INTERPRET_SUM if kind == "sum" else INTERPRET_MM
    return gpu_configs(kind, capability)


def _check_kind(kind: str) -> None:
    if kind not in ("mm", "tmm", "sum"):
        raise ValueError(f"kind must be 'mm', 'tmm' or 'sum', got {kind!r}")


def gpu_configs(kind: str, capability: tuple[int, int]) -> list[triton.Config]:
    """The compiled-mode list for ``kind`` on ``capability``, whatever ``TRITON_INTERPRET`` says."""
    _check_kind(kind)
    if kind == "sum":
        return GPU_SUM
    hopper = capability[0] >= 9
    if kind == "mm":
        return SM90_MM if hopper else SM80_MM
    return SM90_TMM if hopper else SM80_TMM


# Largest shared memory one block may opt in to (CUDA C++ Programming Guide, "Technical Specifications");
# a capability not listed gets the smallest, so pruning stays on the safe side.
SHARED_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448, (10, 0): 232448}
# The operands each kind's main loop stages through shared memory, by kernel argument name.
_STAGED = {"mm": ("X", "W"), "tmm": ("X", "DY"), "sum": ("DY",)}


def shared_limit(capability: tuple[int, int]) -> int:
    """Bytes of shared memory one block may use on ``capability``."""
    return SHARED_LIMIT.get(tuple(capability), min(SHARED_LIMIT.values()))


def shared_estimate(kind: str, config: triton.Config, itemsize: int, capability: tuple[int, int]) -> int:
    """Upper bound on the shared memory ``config`` needs on ``capability``: the software pipeline's copies of
    the dot's two operand tiles (``num_stages`` on sm90+, ``num_stages - 1`` before: Triton 3.9's cubins for
    sm90 with TF32/bf16 hold all stages, sm80's one fewer) plus fp32 row and column vectors changing layout
    beside them (ESTMM's routing scale takes 128 bytes there), or an fp32 ``BLOCK_M x BLOCK_N`` tile for a layout
    change or reduction, whichever is larger. ``tests/test_triton_compile.py`` checks it against compiled kernels."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs.get("BLOCK_K", 0)
    tiles = {"mm": bk * (bm + bn), "tmm": bm * (bk + bn), "sum": 0}[kind]
    buffers = config.num_stages if capability[0] >= 9 else config.num_stages - 1
    return max(buffers * tiles * itemsize + (bm + bn) * 4, bm * bn * 4)


def fits(kind: str, config: triton.Config, capability: tuple[int, int], itemsize: int) -> bool:
    """Whether ``config`` fits one block's shared memory on ``capability`` for operands of ``itemsize`` bytes."""
    return shared_estimate(kind, config, itemsize, capability) <= shared_limit(capability)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def prune(configs_: list[triton.Config], named_args: dict, *, kind: str = "mm",
          capability: tuple[int, int] | None = None, **kwargs) -> list[triton.Config]:
    """Drop tiles much wider than the problem (fine-grained experts have small ``N``/``K``) and, on a GPU of
    ``capability``, tiles whose pipeline does not fit shared memory in the operands' dtype (fp32 needs twice bf16's)."""
    if capability is not None:
        itemsize = max(named_args[name].element_size() for name in _STAGED[kind])
        configs_ = [c for c in configs_ if fits(kind, c, capability, itemsize)] or configs_[-1:]
    n_cap, k_cap = _pow2_at_least_16(named_args["N"]), _pow2_at_least_16(named_args.get("K", 1))
    kept = [c for c in configs_ if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs.get("BLOCK_K", 0) <= k_cap]
    return kept or configs_[-1:]

"""Triton kernels for ESMM, ESTMM and ESS (docs/design.md, "Expert-specific operators").

Same signatures and semantics as the reference, :mod:`ds_hexamoe.ops.torch_ops` (contract: :mod:`ds_hexamoe.ops`).
Each ESMM program finds its row tile's expert segment from ``offs`` on the device (ScatterMoE's block-to-expert
mapping without the extra launch): no tile straddles two experts, nothing is padded, no call syncs with the
host; the grid is an upper bound (``cdiv(P, BLOCK_M) + E + 1`` row tiles), unused programs exit at once.
Positions ``p >= offs[-1]`` form a sentinel segment whose tiles store zeros (no memset, nothing read).
ESTMM/ESS read each ``BLOCK_M`` chunk of an expert's segment exactly once. bf16 stays bf16, products
accumulate in fp32 (fp32 ``tl.dot`` follows ``allow_tf32``), outputs take the torch path's dtype; every
output element is written by one program, without atomics. Importing raises ImportError without Triton
(the dispatcher then falls back to torch).
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the dispatcher treats ImportError as "backend unavailable"
    raise ImportError(
        "ds_hexamoe.kernels.triton_ops needs Triton (pip install triton); set HEXAMOE_KERNELS=torch to use the torch path"
    ) from exc

from ds_hexamoe.ops.checks import check_esmm, check_estmm, check_ess, esmm_out_dtype

from . import autotune as _autotune

# Triton decides interpreter vs compiler when a kernel is decorated, i.e. when this module is imported.
try:
    INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs
    INTERPRETED = _autotune.interpreting()

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _row_tile(pid, OFFS, E, P, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Row tile ``pid`` -> (segment, first row, end row); segment ``E`` is the sentinel tail ``[offs[E], P)``."""
    s = tl.arange(0, E_PAD)
    lo = tl.load(OFFS + s, mask=s <= E, other=P).to(tl.int64)
    hi = tl.load(OFFS + s + 1, mask=s < E, other=P).to(tl.int64)
    n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    seg = tl.sum((tl.cumsum(n_tiles, 0) <= pid).to(tl.int32), 0)
    first = tl.sum(tl.where(s < seg, n_tiles, 0), 0)
    start = tl.sum(tl.where(s == seg, lo, 0), 0) + (pid - first) * BLOCK_M
    end = tl.sum(tl.where(s == seg, hi, 0), 0)
    return seg, start, end


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, BF16_AS_F32: tl.constexpr):
    """``acc + a @ b``. ``BF16_AS_F32`` only under the interpreter: Triton 3.9's interpreter multiplies bf16
    storage as uint16 (garbage); bf16 x bf16 products are exact in fp32, so upcasting changes no result."""
    if BF16_AS_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _esmm_kernel(
    X, W, B, S, IDX, OFFS, Y,
    P, E, N, K, M_X, gather_div,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_s, stride_ym, stride_yn,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    E_PAD: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seg, start, end = _row_tile(tl.program_id(0), OFFS, E, P, BLOCK_M, E_PAD)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    m_mask = rows < end
    pair = tl.load(IDX + rows, mask=m_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if seg < E:  # a real expert; the sentinel tail keeps its zeros
        if GATHER:
            src = pair // gather_div
        else:
            src = rows
        a_mask = m_mask & (src < M_X)  # never read past x, even with a malformed index
        w_base = W + seg.to(tl.int64) * stride_we
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(X + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=a_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a.to(b.dtype), b, acc, PRECISION, BF16_AS_F32)
        if HAS_BIAS:
            bias = tl.load(B + seg.to(tl.int64) * stride_be + cols * stride_bn, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if HAS_SCALE:
            scale = tl.load(S + pair * stride_s, mask=m_mask, other=0.0)
            acc *= scale.to(tl.float32)[:, None]
    if SCATTER:
        out_rows = pair
    else:
        out_rows = rows
    tl.store(Y + out_rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _estmm_kernel(
    X, DY, S, IDX, OFFS, DW,
    N, K, M_X, M_DY, x_div, dy_div,
    stride_xm, stride_xk, stride_dm, stride_dn, stride_s, stride_oe, stride_ok, stride_on,
    X_GATHER: tl.constexpr, DY_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BF16_AS_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    ks = (tl.program_id(1) // n_tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = (tl.program_id(1) % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, n_mask = ks < K, ns < N
    seg_lo = tl.load(OFFS + e).to(tl.int64)
    seg_hi = tl.load(OFFS + e + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # Each BLOCK_M chunk of this expert's segment exactly once, the partial last chunk masked.
    for m0 in range(seg_lo, seg_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m_mask = rows < seg_hi
        pair = tl.load(IDX + rows, mask=m_mask, other=0).to(tl.int64)
        if X_GATHER:
            xr = pair // x_div
        else:
            xr = rows
        if DY_GATHER:
            gr = pair // dy_div
        else:
            gr = rows
        xt = tl.load(X + xr[None, :] * stride_xm + ks[:, None] * stride_xk,
                     mask=k_mask[:, None] & (m_mask & (xr < M_X))[None, :], other=0.0)
        g = tl.load(DY + gr[:, None] * stride_dm + ns[None, :] * stride_dn,
                    mask=(m_mask & (gr < M_DY))[:, None] & n_mask[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(S + pair * stride_s, mask=m_mask, other=0.0)
            g = g.to(tl.float32) * scale.to(tl.float32)[:, None]
        acc = _mma(xt, g.to(xt.dtype), acc, PRECISION, BF16_AS_F32)
    tl.store(DW + e.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + ns[None, :] * stride_on,
             acc.to(DW.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


@triton.jit
def _ess_kernel(
    DY, S, IDX, OFFS, DB,
    N, M_DY, dy_div,
    stride_dm, stride_dn, stride_s, stride_oe, stride_on,
    DY_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    seg_lo = tl.load(OFFS + e).to(tl.int64)
    seg_hi = tl.load(OFFS + e + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(seg_lo, seg_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m_mask = rows < seg_hi
        pair = tl.load(IDX + rows, mask=m_mask, other=0).to(tl.int64)
        if DY_GATHER:
            gr = pair // dy_div
        else:
            gr = rows
        g = tl.load(DY + gr[:, None] * stride_dm + ns[None, :] * stride_dn,
                    mask=(m_mask & (gr < M_DY))[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            g *= tl.load(S + pair * stride_s, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        acc += g
    tl.store(DB + e.to(tl.int64) * stride_oe + ns * stride_on, tl.sum(acc, 0).to(DB.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------------------------------------- launchers
KERNELS = {"esmm": _esmm_kernel, "estmm": _estmm_kernel, "ess": _ess_kernel}
_TUNED: dict = {}


def _tuned(name: str, device: torch.device):
    """The autotuned launcher of kernel ``name`` for ``device``'s architecture (built once, lazily: no CUDA init at import)."""
    cap = None if INTERPRETED or device.type != "cuda" else torch.cuda.get_device_capability(device)
    key = (name, cap)
    if key not in _TUNED:
        kind, keys = _autotune.TUNING[name]
        prune = functools.partial(_autotune.prune, kind=kind, capability=cap)
        _TUNED[key] = triton.autotune(
            configs=_autotune.configs(kind, cap), key=keys, prune_configs_by={"early_config_prune": prune}
        )(KERNELS[name])
    return _TUNED[key]


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_device(*tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if INTERPRETED and device.type != "cpu":
        raise ValueError(
            f"Triton runs in interpreter mode (TRITON_INTERPRET=1 at import) and needs CPU tensors, got {device}; "
            "unset TRITON_INTERPRET before importing ds_hexamoe.kernels to compile for the GPU"
        )
    if not INTERPRETED and device.type == "cpu":
        raise ValueError(
            "the Triton kernels were compiled for a GPU but got CPU tensors; use the torch path on CPU "
            "(HEXAMOE_KERNELS=torch or ds_hexamoe.ops.set_backend('torch')), or set TRITON_INTERPRET=1 before "
            "importing ds_hexamoe.kernels to run Triton's interpreter"
        )


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16 "
            "(use the torch path, HEXAMOE_KERNELS=torch, for other dtypes)"
        )


def _check_kernel_operands(**operands: torch.Tensor | None) -> None:
    """What only the Triton launch needs: supported float dtypes and one device the kernels serve."""
    for name, t in operands.items():
        if t is not None and t.is_floating_point():
            _check_float(name, t)
    _check_device(*operands.values())


def esmm(
    x: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    offs: torch.Tensor,
    *,
    gather_div: int | None = None,
    scatter: bool = False,
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert-specific matmul ``Y[p] = (X[row(p)] @ W[e(p)] + b[e(p)]) * s[idx[p]]``.

    Returns ``[P, N]`` in expert order, or in pair order (row ``idx[p]``) when ``scatter``.
    """
    check_esmm(x, w, idx, offs, gather_div, scatter, bias, row_scale)
    _check_kernel_operands(x=x, w=w, idx=idx, offs=offs, bias=bias, row_scale=row_scale)
    n_pairs, num_experts, K, N = idx.numel(), w.size(0), w.size(1), w.size(2)
    y = torch.empty(n_pairs, N, dtype=esmm_out_dtype(w, bias), device=x.device)
    if y.numel() == 0:
        return y
    idx, offs = idx.contiguous(), offs.contiguous()
    bias_ = bias if bias is not None else y  # placeholder pointer, never read (HAS_BIAS=False)
    scale_ = row_scale if row_scale is not None else y
    grid = lambda meta: (triton.cdiv(n_pairs, meta["BLOCK_M"]) + num_experts + 1, triton.cdiv(N, meta["BLOCK_N"]))
    _tuned("esmm", x.device)[grid](
        x, w, bias_, scale_, idx, offs, y,
        n_pairs, num_experts, N, K, x.size(0), gather_div or 1,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        row_scale.stride(0) if row_scale is not None else 0, y.stride(0), y.stride(1),
        GATHER=gather_div is not None, SCATTER=bool(scatter), HAS_BIAS=bias is not None,
        HAS_SCALE=row_scale is not None, E_PAD=triton.next_power_of_2(num_experts + 1),
        PRECISION=_precision(w.dtype), BF16_AS_F32=INTERPRETED and w.dtype == torch.bfloat16,
    )
    return y


def estmm(
    x: torch.Tensor,
    dy: torch.Tensor,
    idx: torch.Tensor,
    offs: torch.Tensor,
    *,
    x_div: int | None = None,
    dy_div: int | None = None,
    dy_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert-specific transposed matmul ``dW[e] = sum_{p in e} X[row(p)]^T (dY[row(p)] * s[idx[p]])``.

    Returns ``[E, K, N]`` (fp32 accumulation, cast to ``x.dtype``); experts with no rows get zeros.
    """
    check_estmm(x, dy, idx, offs, x_div, dy_div, dy_scale)
    _check_kernel_operands(x=x, dy=dy, idx=idx, offs=offs, dy_scale=dy_scale)
    num_experts, K, N = offs.numel() - 1, x.size(1), dy.size(1)
    dw = torch.empty(num_experts, K, N, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    idx, offs = idx.contiguous(), offs.contiguous()
    scale_ = dy_scale if dy_scale is not None else dw
    grid = lambda meta: (num_experts, triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]))
    _tuned("estmm", x.device)[grid](
        x, dy, scale_, idx, offs, dw,
        N, K, x.size(0), dy.size(0), x_div or 1, dy_div or 1,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dy_scale.stride(0) if dy_scale is not None else 0, dw.stride(0), dw.stride(1), dw.stride(2),
        X_GATHER=x_div is not None, DY_GATHER=dy_div is not None, HAS_SCALE=dy_scale is not None,
        PRECISION=_precision(x.dtype), BF16_AS_F32=INTERPRETED and x.dtype == torch.bfloat16,
    )
    return dw


def ess(
    dy: torch.Tensor,
    idx: torch.Tensor,
    offs: torch.Tensor,
    *,
    dy_div: int | None = None,
    dy_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert-specific sum ``db[e] = sum_{p in e} dY[row(p)] * s[idx[p]]``: ``[E, N]``, fp32 accumulation."""
    check_ess(dy, idx, offs, dy_div, dy_scale)
    _check_kernel_operands(dy=dy, idx=idx, offs=offs, dy_scale=dy_scale)
    num_experts, N = offs.numel() - 1, dy.size(1)
    db = torch.empty(num_experts, N, dtype=dy.dtype, device=dy.device)
    if db.numel() == 0:
        return db
    idx, offs = idx.contiguous(), offs.contiguous()
    scale_ = dy_scale if dy_scale is not None else db
    grid = lambda meta: (num_experts, triton.cdiv(N, meta["BLOCK_N"]))
    _tuned("ess", dy.device)[grid](
        dy, scale_, idx, offs, db,
        N, dy.size(0), dy_div or 1,
        dy.stride(0), dy.stride(1), dy_scale.stride(0) if dy_scale is not None else 0, db.stride(0), db.stride(1),
        DY_GATHER=dy_div is not None, HAS_SCALE=dy_scale is not None,
    )
    return db


__all__ = ["esmm", "estmm", "ess", "INTERPRETED", "SUPPORTED_DTYPES", "esmm_out_dtype", "check_esmm", "check_estmm", "check_ess"]

"""Torch implementation of the expert-specific operators (the CPU path and the reference).

The contract here is exactly the one the Triton kernels in ``ds_hexamoe.kernels`` implement; see
:mod:`ds_hexamoe.ops` for the shared docstring. Rows are addressed through the re-index vector:

* ``div=None``: the operand is already in expert order (row ``p``).
* ``div=g``: the operand row for position ``p`` is ``idx[p] // g``; ``g=k`` reads token order,
  ``g=1`` reads pair order (the layout of ``top_k_weights.reshape(-1)``).

Positions ``p >= offs[-1]`` (expert-parallel sentinels) are never read and their outputs are zero.
"""
from __future__ import annotations

import torch

from .routing import segment_ids

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _rows(t: torch.Tensor, idx: torch.Tensor, n_valid: int, div: int | None) -> torch.Tensor:
    if div is None:
        return t[:n_valid]
    src = idx[:n_valid] if div == 1 else torch.div(idx[:n_valid], div, rounding_mode="floor")
    return t.index_select(0, src)


def _aligned(*ts: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned base pointers and non-unit strides."""
    for t in ts:
        size = t.element_size()
        if t.data_ptr() % 16 or any(st != 1 and (st * size) % 16 for st in t.stride()):
            return False
    return True


def _use_grouped_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _HAS_GROUPED_MM and a.dtype == b.dtype and a.dtype in (torch.float32, torch.bfloat16) and _aligned(a, b)


def _grouped_matmul(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """``a[P, K]`` in expert order times ``w[E, K, N]``, one product per segment."""
    if _use_grouped_mm(a, w):
        return torch._grouped_mm(a, w, offs=offs[1:].to(torch.int32))
    out = a.new_empty(a.size(0), w.size(2))
    for e in range(w.size(0)):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi], w[e], out=out[lo:hi])
    return out


def _grouped_tmatmul(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """``sum_{p in e} x[p]^T dy[p]`` per expert, both operands in expert order."""
    if _use_grouped_mm(x.t(), dy):
        return torch._grouped_mm(x.t(), dy, offs=offs[1:].to(torch.int32))
    num_experts = offs.numel() - 1
    out = x.new_zeros(num_experts, x.size(1), dy.size(1))
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x[lo:hi].t(), dy[lo:hi], out=out[e])
    return out


def _gathered_tmatmul(x, dy, idx, bounds, x_div, dy_div) -> torch.Tensor:
    """ESTMM with one operand read through ``idx``: its rows are gathered one expert at a time, so the
    temporary is one segment (``[P/E, K]``) rather than a ``[P, K]`` copy held beside the ``[E, K, N]`` result."""
    out = x.new_empty(len(bounds) - 1, x.size(1), dy.size(1))
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            out[e].zero_()
            continue
        xs = x[lo:hi] if x_div is None else _segment_rows(x, idx[lo:hi], x_div)
        gs = dy[lo:hi] if dy_div is None else _segment_rows(dy, idx[lo:hi], dy_div)
        torch.mm(xs.t(), gs, out=out[e])
    return out


def _segment_rows(t: torch.Tensor, idx: torch.Tensor, div: int) -> torch.Tensor:
    return t.index_select(0, idx if div == 1 else torch.div(idx, div, rounding_mode="floor"))


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
    n_pairs = idx.numel()
    bounds = offs.tolist()  # the one host sync per call; the loop fallback and sentinels need it
    n_valid = bounds[-1]
    xs = _rows(x, idx, n_valid, gather_div)
    if xs.dtype != w.dtype:
        xs = xs.to(w.dtype)
    y = _grouped_matmul(xs.contiguous(), w, offs, bounds)[:n_valid]
    if bias is not None:
        y = y + bias.index_select(0, segment_ids(offs, n_valid))
    if row_scale is not None:  # y is this call's own buffer: scale in place
        y.mul_(row_scale.index_select(0, idx[:n_valid]).unsqueeze(-1).to(y.dtype))
    if n_valid == n_pairs and not scatter:
        return y
    out = y.new_zeros(n_pairs, y.size(1))
    if scatter:
        out.index_copy_(0, idx[:n_valid], y)
    else:
        out[:n_valid] = y
    return out


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
    bounds = offs.tolist()
    n_valid = bounds[-1]
    if dy_scale is None and (x_div is None) != (dy_div is None) and x.dtype == dy.dtype:
        return _gathered_tmatmul(x, dy, idx, bounds, x_div, dy_div)
    xs = _rows(x, idx, n_valid, x_div)
    gs = _rows(dy, idx, n_valid, dy_div)
    if dy_scale is not None:
        gs = gs * dy_scale.index_select(0, idx[:n_valid]).unsqueeze(-1).to(gs.dtype)
    gs = gs.to(xs.dtype)
    return _grouped_tmatmul(xs.contiguous(), gs.contiguous(), offs, bounds)


def ess(
    dy: torch.Tensor,
    idx: torch.Tensor,
    offs: torch.Tensor,
    *,
    dy_div: int | None = None,
    dy_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert-specific sum ``db[e] = sum_{p in e} dY[row(p)] * s[idx[p]]``: ``[E, N]``, fp32 accumulation."""
    n_valid = int(offs[-1])
    acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
    gs = _rows(dy, idx, n_valid, dy_div).to(acc)
    if dy_scale is not None:
        gs = gs * dy_scale.index_select(0, idx[:n_valid]).unsqueeze(-1).to(acc)
    out = torch.zeros(offs.numel() - 1, dy.size(1), dtype=acc, device=dy.device)
    out.index_add_(0, segment_ids(offs, n_valid), gs)
    return out.to(dy.dtype)

"""Operand checks shared by the torch path, the ``torch.library`` ops and the Triton kernels.

They read shapes, dtypes and Python arguments only, never tensor data, so they run in fake (meta)
implementations under ``torch.compile`` and make no host sync.
"""
from __future__ import annotations

import torch

from .activations import get_activation


def _check_index(idx: torch.Tensor, offs: torch.Tensor, num_experts: int | None = None) -> None:
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be a 1-D int64/int32 re-index vector (build_expert_index), got {idx.dtype} {tuple(idx.shape)}")
    if offs.dim() != 1 or offs.numel() < 1 or offs.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offs must be 1-D int64/int32 segment bounds [E+1] (build_expert_index), got {offs.dtype} {tuple(offs.shape)}")
    if num_experts is not None and offs.numel() != num_experts + 1:
        raise ValueError(f"offs has {offs.numel()} entries but the weights have E={num_experts} experts; offs must be [E+1]")


def _check_div(name: str, div: int | None) -> None:
    if div is not None and (not isinstance(div, int) or isinstance(div, bool) or div < 1):
        raise ValueError(f"{name} must be None (expert order) or a positive int (row = idx[p] // {name}), got {div!r}")


def _check_scale(name: str, s: torch.Tensor | None, n_pairs: int) -> None:
    if s is not None and (s.dim() != 1 or s.numel() != n_pairs):
        raise ValueError(f"{name} must be [P={n_pairs}] in pair order (top_k_weights.reshape(-1)), got {tuple(s.shape)}")


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(t.shape)}")


def esmm_out_dtype(w: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The torch path's output dtype: ``w``'s (``x`` is cast to it), promoted with ``bias``'s."""
    return w.dtype if bias is None else torch.promote_types(w.dtype, bias.dtype)


def check_esmm(x, w, idx, offs, gather_div, scatter, bias, row_scale) -> None:
    """Validate ESMM operand shapes and index arguments without touching their data (no host sync)."""
    _check_2d("x", x)
    if w.dim() != 3:
        raise ValueError(f"w must be [E, K, N] (pass gate_up_proj.transpose(1, 2) for [E, out, in] weights), got {tuple(w.shape)}")
    _check_index(idx, offs, w.size(0))
    _check_div("gather_div", gather_div)
    if x.size(1) != w.size(1):
        raise ValueError(f"x has K={x.size(1)} features but w is [E, K={w.size(1)}, N={w.size(2)}]; "
                         "w must be [E, in, out] (transpose [E, out, in] parameters with .transpose(1, 2))")
    if bias is not None:
        if bias.dim() != 2 or tuple(bias.shape) != (w.size(0), w.size(2)):
            raise ValueError(f"bias must be [E={w.size(0)}, N={w.size(2)}], got {tuple(bias.shape)}")
    _check_scale("row_scale", row_scale, idx.numel())


def check_estmm(x, dy, idx, offs, x_div, dy_div, dy_scale) -> None:
    _check_2d("x", x)
    _check_2d("dy", dy)
    _check_index(idx, offs)
    _check_div("x_div", x_div)
    _check_div("dy_div", dy_div)
    _check_scale("dy_scale", dy_scale, idx.numel())


def check_ess(dy, idx, offs, dy_div, dy_scale) -> None:
    _check_2d("dy", dy)
    _check_index(idx, offs)
    _check_div("dy_div", dy_div)
    _check_scale("dy_scale", dy_scale, idx.numel())


def check_expert_mlp(x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale) -> None:
    """Validate the fused MLP's operands before any kernel runs."""
    get_activation(act)  # unknown activation: ValueError naming the choices
    if x.dim() != 2:
        raise ValueError(f"x must be token-order [T, d], got shape {tuple(x.shape)}")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w1 must be [E, d, F1] and w2 [E, f, d_out], got {tuple(w1.shape)} and {tuple(w2.shape)}; "
                         "pass gate_up_proj.transpose(1, 2) and down_proj.transpose(1, 2)")
    if w1.size(0) != w2.size(0):
        raise ValueError(f"w1 has {w1.size(0)} experts but w2 has {w2.size(0)}")
    f = w1.size(2) // 2 if gated else w1.size(2)
    if (gated and w1.size(2) % 2) or w2.size(1) != f:
        raise ValueError(f"w2 must be [E, f={f}, d_out] for w1 [E, d, F1={w1.size(2)}] (gated={gated}: "
                         f"F1 = {'2f' if gated else 'f'}), got w2 {tuple(w2.shape)}")
    if not isinstance(k, int) or k < 1 or idx.numel() != x.size(0) * k:
        raise ValueError(f"idx must hold T*k = {x.size(0)}*{k} pairs (build_expert_index(top_k_index[T, k], E)), "
                         f"got {idx.numel()}")
    if b1 is not None and tuple(b1.shape) != (w1.size(0), w1.size(2)):
        raise ValueError(f"b1 must be [E, F1] = {(w1.size(0), w1.size(2))}, got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (w2.size(0), w2.size(2)):
        raise ValueError(f"b2 must be [E, d_out] = {(w2.size(0), w2.size(2))}, got {tuple(b2.shape)}")
    check_esmm(x, w1, idx, offs, k, False, b1, None)
    if row_scale is not None and (row_scale.dim() != 1 or row_scale.numel() != idx.numel()):
        raise ValueError(f"row_scale must be [T*k={idx.numel()}] routing weights in pair order "
                         f"(top_k_weights.reshape(-1)), got {tuple(row_scale.shape)}")

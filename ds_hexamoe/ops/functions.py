"""Autograd functions for expert layers, built only from ESMM, ESTMM and ESS.

Backward in closed form (docs/design.md, "Expert-specific operators"):
``db2 = ESS(dy)``, ``dW2 = ESTMM(a, dy)``, ``da = ESMM(dy, W2^T)``, ``dh = da * act'(h)``,
``db1 = ESS(dh)``, ``dW1 = ESTMM(x, dh)``, ``dx = ESMM(dh, W1^T)``.
Routing weights scale the expert outputs and receive gradients (``ds = <dy, y_unscaled>``).
The combine over the ``k`` choices is a reshape + fp32 sum (deterministic, no atomics).
"""
from __future__ import annotations

import torch

from .activations import backward_fn, get_activation
from .dispatch import get_backend
from .routing import ExpertIndex, segment_ids


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the dtype itself otherwise (fp64 stays fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(a.dtype)
    return (a.to(acc) * b.to(acc)).sum(-1)


def _pairs_to_tokens(y_pairs: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return y_pairs.view(-1, k, y_pairs.size(-1)).sum(1, dtype=acc_dtype(y_pairs.dtype)).to(dtype)


def _scale_grad(
    dy_rows: torch.Tensor, t: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, index: ExpertIndex
) -> torch.Tensor:
    """Gradient of the per-pair routing weight: ``<dy, a @ W + b>`` written in pair order."""
    n_valid = t.size(0)
    ds = _row_dot(t, a)
    if bias is not None:
        ds = ds + _row_dot(dy_rows, bias.index_select(0, segment_ids(index.offs, n_valid)))
    out = ds.new_zeros(index.num_pairs)
    out.index_copy_(0, index.idx[:n_valid], ds)
    return out


class ExpertLinearFunction(torch.autograd.Function):
    """``Y = ESMM(x, w)`` for one expert linear; ``w`` is ``[E, K, N]`` (any strides)."""

    @staticmethod
    def forward(ctx, x, w, bias, row_scale, index: ExpertIndex, gather_div, scatter):
        ops = get_backend(x.device)
        y = ops.esmm(x, w, index.idx, index.offs, gather_div=gather_div, scatter=scatter, bias=bias, row_scale=row_scale)
        ctx.save_for_backward(x, w, bias, row_scale)
        ctx.index, ctx.gather_div, ctx.scatter = index, gather_div, scatter
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, bias, row_scale = ctx.saved_tensors
        index, gdiv, scatter = ctx.index, ctx.gather_div, ctx.scatter
        idx, offs = index.idx, index.offs
        ops = get_backend(dy.device)
        dy_div = 1 if scatter else None
        dx = dw = db = ds = None
        wt = w.transpose(1, 2)
        if ctx.needs_input_grad[3]:
            n_valid = int(offs[-1])
            t = ops.esmm(dy, wt, idx, offs, gather_div=dy_div)[:n_valid]
            dy_rows = dy.index_select(0, idx[:n_valid]) if scatter else dy[:n_valid]
            x_rows = x[:n_valid] if gdiv is None else x.index_select(0, torch.div(idx[:n_valid], gdiv, rounding_mode="floor"))
            ds = _scale_grad(dy_rows, t, x_rows, bias, index).to(row_scale.dtype)
            if ctx.needs_input_grad[0]:
                t = t * row_scale.index_select(0, idx[:n_valid]).unsqueeze(-1).to(t.dtype)
                full = t.new_zeros(index.num_pairs, t.size(1))
                if gdiv is None:
                    full[:n_valid] = t
                else:
                    full.index_copy_(0, idx[:n_valid], t)
                dx = full
        elif ctx.needs_input_grad[0]:
            dx = ops.esmm(dy, wt, idx, offs, gather_div=dy_div, scatter=gdiv is not None, row_scale=row_scale)
        if dx is not None:
            if gdiv is not None and gdiv > 1:
                dx = _pairs_to_tokens(dx, gdiv, x.dtype)
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = ops.estmm(x, dy, idx, offs, x_div=gdiv, dy_div=dy_div, dy_scale=row_scale).to(w.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            db = ops.ess(dy, idx, offs, dy_div=dy_div, dy_scale=row_scale).to(bias.dtype)
        return dx, dw, db, ds, None, None, None


def expert_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    index: ExpertIndex,
    *,
    gather_div: int | None = None,
    scatter: bool = False,
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable expert linear ``[P, N]``: see :func:`ds_hexamoe.ops.torch_ops.esmm` for the row maps."""
    return ExpertLinearFunction.apply(x, w, bias, row_scale, index, gather_div, scatter)


def _split_gate(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    f = h.size(1) // 2
    return h[:, :f], h[:, f:]


def _activate(h: torch.Tensor, act: str, gated: bool, interleaved: bool) -> torch.Tensor:
    fn, _ = get_activation(act)
    if not gated:
        return fn(h)
    g, u = _split_gate(h, interleaved)
    return fn(g) * u


def _activate_backward(
    h: torch.Tensor, da: torch.Tensor, act: str, gated: bool, interleaved: bool, act_g: torch.Tensor | None = None
) -> torch.Tensor:
    """``dh`` from ``da`` in closed form; ``act_g`` is ``act(gate)`` when the caller already has it."""
    fn, _ = get_activation(act)
    bwd = backward_fn(act)
    acc = acc_dtype(h.dtype)
    hf, daf = h.to(acc), da.to(acc)
    if not gated:
        return bwd(daf, hf).to(h.dtype)
    g, u = _split_gate(hf, interleaved)
    # write both halves straight into dh: no concatenated copy
    dh = torch.empty(h.shape, dtype=acc, device=h.device)
    dg, du = _split_gate(dh, interleaved)
    dg.copy_(bwd(daf * u, g))
    du.copy_(daf * (act_g if act_g is not None and act_g.dtype == acc else fn(g)))
    return dh.to(h.dtype)


class ExpertMLPFunction(torch.autograd.Function):
    """Fused expert MLP: token-order ``x[T, d]`` to token-order ``y[T, d]``.

    Saves only ``x`` and the pre-activation ``h[P, F1]``: activation memory ``O(T*k*f)``.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, b1, b2, row_scale, index: ExpertIndex, act, gated, interleaved):
        ops = get_backend(x.device)
        idx, offs, k = index.idx, index.offs, index.k
        h = ops.esmm(x, w1, idx, offs, gather_div=k, bias=b1)
        a = _activate(h, act, gated, interleaved)
        y = ops.esmm(a, w2, idx, offs, scatter=True, bias=b2, row_scale=row_scale)
        ctx.save_for_backward(x, h, w1, w2, b1, b2, row_scale)
        ctx.index, ctx.act, ctx.gated, ctx.interleaved = index, act, gated, interleaved
        return _pairs_to_tokens(y, k, x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, h, w1, w2, b1, b2, row_scale = ctx.saved_tensors
        index, act, gated, inter = ctx.index, ctx.act, ctx.gated, ctx.interleaved
        idx, offs, k = index.idx, index.offs, index.k
        ops = get_backend(dout.device)
        dout = dout.contiguous()
        n_valid = int(offs[-1])
        act_g = None
        if gated:  # act(gate) serves both the recomputed activation and du
            g, u = _split_gate(h, inter)
            act_g = get_activation(act)[0](g)
            a = act_g * u
        else:
            a = _activate(h, act, gated, inter)
        t2 = ops.esmm(dout, w2.transpose(1, 2), idx, offs, gather_div=k)  # dy @ W2^T, unscaled
        ds = None
        if row_scale is not None:
            if ctx.needs_input_grad[5]:
                dy_rows = dout.index_select(0, torch.div(idx[:n_valid], k, rounding_mode="floor"))
                ds = _scale_grad(dy_rows, t2[:n_valid], a[:n_valid], b2, index).to(row_scale.dtype)
            s = torch.zeros(t2.size(0), dtype=t2.dtype, device=t2.device)
            s[:n_valid] = row_scale.index_select(0, idx[:n_valid]).to(t2.dtype)
            t2.mul_(s.unsqueeze(-1))  # in place: the unscaled product is no longer needed
        da, t2 = t2, None
        dw2 = ops.estmm(a, dout, idx, offs, dy_div=k, dy_scale=row_scale).to(w2.dtype)
        db2 = ops.ess(dout, idx, offs, dy_div=k, dy_scale=row_scale).to(b2.dtype) if b2 is not None else None
        a = None  # free [P, f] before the activation backward allocates dh
        dh = _activate_backward(h, da, act, gated, inter, act_g=act_g)
        da = act_g = None
        dw1 = ops.estmm(x, dh, idx, offs, x_div=k).to(w1.dtype)
        db1 = ops.ess(dh, idx, offs).to(b1.dtype) if b1 is not None else None
        dx = _pairs_to_tokens(ops.esmm(dh, w1.transpose(1, 2), idx, offs, scatter=True), k, x.dtype)
        return dx, dw1, dw2, db1, db2, ds, None, None, None, None


def expert_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    index: ExpertIndex,
    *,
    act: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_j s[t, j] * expert_{e[t, j]}(x[t])`` for token-order ``x[T, d]``.

    ``w1``: ``[E, d, F1]`` (``F1 = 2f`` gated, ``[gate; up]`` or interleaved), ``w2``: ``[E, f, d]``;
    pass transformers' ``gate_up_proj.transpose(1, 2)`` and ``down_proj.transpose(1, 2)`` views.
    ``row_scale``: ``[T*k]`` routing weights in pair order (``top_k_weights.reshape(-1)``).
    """
    return ExpertMLPFunction.apply(x, w1, w2, b1, b2, row_scale, index, act, gated, interleaved)

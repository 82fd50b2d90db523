"""Forward and closed-form backward of the expert layers, built only from ESMM, ESTMM and ESS.

Each function takes the backend module ``ops`` (``esmm``/``estmm``/``ess``) and plain tensors; the
differentiable entry points that call them are the ``torch.library`` ops of :mod:`.library`.

Backward in closed form (docs/design.md, "Expert-specific operators"):
``db2 = ESS(dy)``, ``dW2 = ESTMM(a, dy)``, ``da = ESMM(dy, W2^T)``, ``dh = da * act'(h)``,
``db1 = ESS(dh)``, ``dW1 = ESTMM(x, dh)``, ``dx = ESMM(dh, W1^T)``.
Routing weights scale the expert outputs and receive gradients (``ds = <dy, y_unscaled>``).
The combine over the ``k`` choices is a reshape + fp32 sum (deterministic, no atomics).
"""
from __future__ import annotations

import torch

from .activations import backward_fn, get_activation
from .routing import segment_ids


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the dtype itself otherwise (fp64 stays fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(a.dtype)
    if a.dtype == b.dtype == acc:  # batched dot: no [rows, n] product buffer
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return (a.to(acc) * b.to(acc)).sum(-1)


def _pairs_to_tokens(y_pairs: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return y_pairs.view(-1, k, y_pairs.size(-1)).sum(1, dtype=acc_dtype(y_pairs.dtype)).to(dtype)


def _scale_grad(
    dy_rows: torch.Tensor, t: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
    offs: torch.Tensor,
) -> torch.Tensor:
    """Gradient of the per-pair routing weight: ``<dy, a @ W + b>`` written in pair order."""
    n_valid = t.size(0)
    ds = _row_dot(t, a)
    if bias is not None:
        ds = ds + _row_dot(dy_rows, bias.index_select(0, segment_ids(offs, n_valid)))
    out = ds.new_zeros(idx.numel())
    out.index_copy_(0, idx[:n_valid], ds)
    return out


def linear_forward(ops, x, w, idx, offs, gather_div, scatter, bias, row_scale) -> torch.Tensor:
    """``Y = ESMM(x, w)`` for one expert linear; ``w`` is ``[E, K, N]`` (any strides)."""
    return ops.esmm(x, w, idx, offs, gather_div=gather_div, scatter=scatter, bias=bias, row_scale=row_scale)


def linear_backward(ops, dy, x, w, idx, offs, gdiv, scatter, bias, row_scale, needs):
    """``(dx, dw, db, ds)`` of :func:`linear_forward`; ``needs`` flags which of the four are wanted."""
    dy_div = 1 if scatter else None
    dx = dw = db = ds = None
    wt = w.transpose(1, 2)
    if row_scale is not None and needs[3]:
        n_valid = int(offs[-1])
        t = ops.esmm(dy, wt, idx, offs, gather_div=dy_div)[:n_valid]
        dy_rows = dy.index_select(0, idx[:n_valid]) if scatter else dy[:n_valid]
        x_rows = x[:n_valid] if gdiv is None else x.index_select(0, torch.div(idx[:n_valid], gdiv, rounding_mode="floor"))
        ds = _scale_grad(dy_rows, t, x_rows, bias, idx, offs).to(row_scale.dtype)
        if needs[0]:
            t = t * row_scale.index_select(0, idx[:n_valid]).unsqueeze(-1).to(t.dtype)
            full = t.new_zeros(idx.numel(), t.size(1))
            if gdiv is None:
                full[:n_valid] = t
            else:
                full.index_copy_(0, idx[:n_valid], t)
            dx = full
    elif needs[0]:
        dx = ops.esmm(dy, wt, idx, offs, gather_div=dy_div, scatter=gdiv is not None, row_scale=row_scale)
    if dx is not None:
        if gdiv is not None and gdiv > 1:
            dx = _pairs_to_tokens(dx, gdiv, x.dtype)
        dx = dx.to(x.dtype)
    if needs[1]:
        dw = weight_grad(ops, x, dy, idx, offs, w, x_div=gdiv, dy_div=dy_div, dy_scale=row_scale)
    if bias is not None and needs[2]:
        db = ops.ess(dy, idx, offs, dy_div=dy_div, dy_scale=row_scale).to(bias.dtype)
    return dx, dw, db, ds


def _split_gate(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    f = h.size(1) // 2
    return h[:, :f], h[:, f:]


def activate(h: torch.Tensor, act: str, gated: bool, interleaved: bool) -> torch.Tensor:
    """``act(h)``, or ``act(gate) * up`` of a gated ``h`` (``[gate; up]`` or interleaved); differentiable."""
    fn, _ = get_activation(act)
    if not gated:
        return fn(h)
    g, u = _split_gate(h, interleaved)
    return fn(g) * u


SILU_OUT = ("silu", "swish")  # activations whose fused backward writes into a strided half of dh


def _activate_backward(
    h: torch.Tensor, da: torch.Tensor, act: str, gated: bool, interleaved: bool, act_g: torch.Tensor | None = None,
    da_owned: bool = False,
) -> torch.Tensor:
    """``dh`` from ``da`` in closed form; ``act_g`` is ``act(gate)`` when the caller already has it;
    ``da_owned``: the caller no longer needs ``da``, so it may be overwritten."""
    fn, _ = get_activation(act)
    bwd = backward_fn(act)
    acc = acc_dtype(h.dtype)
    hf, daf = h.to(acc), da.to(acc)
    if not gated:
        return bwd(daf, hf).to(h.dtype)
    g, u = _split_gate(hf, interleaved)
    # write both halves straight into dh: no concatenated copy, no temporaries beyond one [P, f]
    dh = torch.empty(h.shape, dtype=acc, device=h.device)
    dg, du = _split_gate(dh, interleaved)
    torch.mul(daf, act_g if act_g is not None and act_g.dtype == acc else fn(g), out=du)
    t = daf.mul_(u) if daf is not da or da_owned else daf * u
    if act in SILU_OUT:
        torch.ops.aten.silu_backward.grad_input(t, g, grad_input=dg)
    else:
        dg.copy_(bwd(t, g))
    return dh.to(h.dtype)


def grad_layout_transposed(w: torch.Tensor) -> bool:
    """True when ``w[E, K, N]`` is a view of ``[E, N, K]`` storage (transformers' parameters, transposed)."""
    return w.stride(1) < w.stride(2)


def weight_grad(ops, x, dy, idx, offs, w, *, x_div=None, dy_div=None, dy_scale=None) -> torch.Tensor:
    """``dW[e] = sum_p s_p x_p^T dy_p`` in ``w``'s memory layout, so AccumulateGrad adds it to the parameter
    without a strided copy (a transposed ``[E, K, N]`` copy of a Mixtral-size weight costs as much as a GEMM)."""
    if grad_layout_transposed(w):  # (s x)^T dy = (dy^T (s x))^T: the scale may sit on either operand
        g = ops.estmm(dy, x, idx, offs, x_div=dy_div, dy_div=x_div, dy_scale=dy_scale).transpose(1, 2)
    else:
        g = ops.estmm(x, dy, idx, offs, x_div=x_div, dy_div=dy_div, dy_scale=dy_scale)
    return g.to(w.dtype)


def _bag_combine(t: torch.Tensor) -> bool:
    """Combine over ``k`` with one ``embedding_bag`` (gather, weight and sum in a single pass): CPU fp32/fp64,
    where it is deterministic; elsewhere the pair-order scatter and reshape-sum stay (no atomics)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def inverse_index(idx: torch.Tensor) -> torch.Tensor:
    """``inv[pair] = position``: where each (token, choice) pair sits in expert order."""
    return torch.empty_like(idx).index_copy_(0, idx, torch.arange(idx.numel(), device=idx.device, dtype=idx.dtype))


def combine(y: torch.Tensor, inv: torch.Tensor, k: int, row_scale: torch.Tensor | None, dtype) -> torch.Tensor:
    """``out[t] = sum_j s[t*k+j] * y[inv[t*k+j]]`` for expert-order ``y[P, N]`` (rows past ``offs[-1]`` zero)."""
    w = None if row_scale is None else row_scale.to(y.dtype).view(-1, k)
    return torch.nn.functional.embedding_bag(inv.view(-1, k), y, per_sample_weights=w, mode="sum").to(dtype)


def mlp_forward(ops, x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale):
    """Token-order ``x[T, d]`` -> ``(y[T, d_out], h[P, F1])``; ``h`` (pre-activation) is all backward keeps
    besides ``x``: activation memory ``O(T*k*f)``."""
    h = ops.esmm(x, w1, idx, offs, gather_div=k, bias=b1)
    a = activate(h, act, gated, interleaved)
    if _bag_combine(a):
        return combine(ops.esmm(a, w2, idx, offs, bias=b2), inverse_index(idx), k, row_scale, x.dtype), h
    y = ops.esmm(a, w2, idx, offs, scatter=True, bias=b2, row_scale=row_scale)
    return _pairs_to_tokens(y, k, x.dtype), h


def _recompute_activation(h, act, gated, inter):
    """``(a, act(gate))``: act(gate) serves both the recomputed activation and ``du``."""
    if not gated:
        return activate(h, act, gated, inter), None
    g, u = _split_gate(h, inter)
    act_g = get_activation(act)[0](g)
    return act_g * u, act_g


def _activate_backward_into_h(h: torch.Tensor, da: torch.Tensor, act: str, gated: bool, interleaved: bool,
                              act_g: torch.Tensor | None) -> torch.Tensor:
    """``dh`` written over ``h`` (same shape; ``h`` is read only element-wise before its own slot is written),
    so the backward holds one ``[P, F1]`` buffer instead of two. ``da`` and ``act_g`` are overwritten."""
    bwd = backward_fn(act)
    if not gated:
        if act in SILU_OUT:
            torch.ops.aten.silu_backward.grad_input(da, h, grad_input=h)
        else:
            h.copy_(bwd(da, h))
        return h
    g, u = _split_gate(h, interleaved)
    du = (act_g if act_g is not None else get_activation(act)[0](g)).mul_(da)  # act(g) * da
    t = da.mul_(u)  # da * u: read u before du overwrites it
    if act in SILU_OUT:  # element-wise, so writing dg over g is safe (each element read before written)
        torch.ops.aten.silu_backward.grad_input(t, g, grad_input=g)
    else:
        g.copy_(bwd(t, g))
    u.copy_(du)
    return h


def _input_grads(ops, dh, x, w1, idx, offs, k, needs):
    """``(dx, dw1)`` from ``dh``: ``dx`` first, so its ``[P, d]`` expert-order buffer is freed before ``dw1``
    (the largest gradient) is allocated; ``dw1``'s token rows are gathered per expert (:func:`weight_grad`)."""
    dx = None
    if needs[0] and _bag_combine(dh):
        dx = combine(ops.esmm(dh, w1.transpose(1, 2), idx, offs), inverse_index(idx), k, None, x.dtype)
    elif needs[0]:
        dx = _pairs_to_tokens(ops.esmm(dh, w1.transpose(1, 2), idx, offs, scatter=True), k, x.dtype)
    dw1 = weight_grad(ops, x, dh, idx, offs, w1, x_div=k) if needs[1] else None
    return dx, dw1


def mlp_backward(ops, dout, x, h, w1, w2, idx, offs, k, act, gated, inter, b1, b2, row_scale, needs,
                 reuse_h=False):
    """``(dx, dw1, dw2, db1, db2, ds)`` of :func:`mlp_forward`; ``needs`` flags the wanted ones.

    ``reuse_h``: ``h`` is dead after this call (autograd frees it and keeps no graph), so ``dh`` is written
    over it in fp32/fp64 instead of into a second ``[P, F1]`` buffer; ``h`` then holds ``dh``."""
    n_valid = int(offs[-1])
    rows = idx[:n_valid]
    # dy rows in expert order, gathered once for dA, ds, dW2 and db2 (each would gather them again)
    dy = dout.index_select(0, torch.div(rows, k, rounding_mode="floor"))
    a, act_g = _recompute_activation(h, act, gated, inter)
    da = ops.esmm(dy, w2.transpose(1, 2), idx, offs)  # dy @ W2^T, unscaled; zero past n_valid
    ds = None
    if row_scale is not None:
        s = row_scale.index_select(0, rows).unsqueeze(-1)
        if needs[5]:
            ds = _scale_grad(dy, da[:n_valid], a[:n_valid], b2, idx, offs).to(row_scale.dtype)
        da[:n_valid].mul_(s.to(da.dtype))  # in place: the unscaled products are no longer needed
        dy.mul_(s.to(dy.dtype))
    dw2 = weight_grad(ops, a, dy, idx, offs, w2) if needs[2] else None
    db2 = ops.ess(dy, idx, offs).to(b2.dtype) if b2 is not None and needs[4] else None
    a = dy = None  # free [P, f] and [P, d] before the activation backward
    if reuse_h and h.dtype == acc_dtype(h.dtype) and da.dtype == h.dtype:
        dh = _activate_backward_into_h(h, da, act, gated, inter, act_g)
    else:
        dh = _activate_backward(h, da, act, gated, inter, act_g=act_g, da_owned=True)
    da = act_g = None
    db1 = ops.ess(dh, idx, offs).to(b1.dtype) if b1 is not None and needs[3] else None
    dx, dw1 = _input_grads(ops, dh, x, w1, idx, offs, k, needs)
    return dx, dw1, dw2, db1, db2, ds

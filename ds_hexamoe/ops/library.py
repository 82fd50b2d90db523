"""The ``torch.library`` ops every model path goes through, so ``torch.compile`` traces it whole.

* ``hexamoe::esmm``, ``hexamoe::estmm``, ``hexamoe::ess``: the three operators (contract: :mod:`ds_hexamoe.ops`).
* ``hexamoe::expert_mlp`` -> ``(y, h)`` and ``hexamoe::expert_linear`` -> ``y``: the differentiable layers; their
  backward is one more op each (``hexamoe::expert_mlp_backward``, ``hexamoe::expert_linear_backward``), the
  closed form of :mod:`.functions`. Eager backward that frees its graph runs ``hexamoe::expert_mlp_backward_``
  instead, which writes the pre-activation's gradient over ``h`` (after backward, ``h`` holds ``dh``).

Every op is opaque to the compiler and has a fake (meta) implementation that validates shapes from
metadata alone, so a compiled graph holds each op in one piece and never breaks on the host syncs or
data-dependent slicing the torch path does inside. Each op runs the backend :func:`~.dispatch.get_backend`
chose for the device (torch on CPU, Triton on CUDA), in eager mode and compiled alike.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import check_esmm, check_ess, check_estmm, check_expert_mlp, esmm_out_dtype
from .dispatch import get_backend
from .functions import grad_layout_transposed, linear_backward, linear_forward, mlp_backward, mlp_forward
from .routing import ExpertIndex


# ------------------------------------------------------------------------------------------ the three ops
@torch.library.custom_op("hexamoe::esmm", mutates_args=())
def esmm(
    x: Tensor, w: Tensor, idx: Tensor, offs: Tensor, gather_div: Optional[int] = None, scatter: bool = False,
    bias: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
) -> Tensor:
    return get_backend(x.device).esmm(x, w, idx, offs, gather_div=gather_div, scatter=scatter, bias=bias,
                                      row_scale=row_scale)


@esmm.register_fake
def _esmm_fake(x, w, idx, offs, gather_div=None, scatter=False, bias=None, row_scale=None):
    check_esmm(x, w, idx, offs, gather_div, scatter, bias, row_scale)
    return x.new_empty(idx.numel(), w.size(2), dtype=esmm_out_dtype(w, bias))


@torch.library.custom_op("hexamoe::estmm", mutates_args=())
def estmm(
    x: Tensor, dy: Tensor, idx: Tensor, offs: Tensor, x_div: Optional[int] = None, dy_div: Optional[int] = None,
    dy_scale: Optional[Tensor] = None,
) -> Tensor:
    return get_backend(x.device).estmm(x, dy, idx, offs, x_div=x_div, dy_div=dy_div, dy_scale=dy_scale)


@estmm.register_fake
def _(x, dy, idx, offs, x_div=None, dy_div=None, dy_scale=None):
    check_estmm(x, dy, idx, offs, x_div, dy_div, dy_scale)
    return x.new_empty(offs.numel() - 1, x.size(1), dy.size(1))


@torch.library.custom_op("hexamoe::ess", mutates_args=())
def ess(dy: Tensor, idx: Tensor, offs: Tensor, dy_div: Optional[int] = None, dy_scale: Optional[Tensor] = None) -> Tensor:
    return get_backend(dy.device).ess(dy, idx, offs, dy_div=dy_div, dy_scale=dy_scale)


@ess.register_fake
def _(dy, idx, offs, dy_div=None, dy_scale=None):
    check_ess(dy, idx, offs, dy_div, dy_scale)
    return dy.new_empty(offs.numel() - 1, dy.size(1))


def _absent(t: Tensor) -> Tensor:
    """Stands for a gradient that is not wanted (an op cannot return None)."""
    return t.new_empty(0)


def _grad_like(t: Tensor) -> Tensor:
    """A gradient with the strides the real op returns (:func:`.functions.weight_grad` follows ``w``'s layout)."""
    if t.dim() == 3 and grad_layout_transposed(t):
        return t.new_empty(t.size(0), t.size(2), t.size(1)).transpose(1, 2)
    return t.new_empty(t.shape)


def _present(grads, wanted) -> list:
    return [g if want else None for g, want in zip(grads, wanted)]


# ------------------------------------------------------------------------------------------ expert MLP
@torch.library.custom_op("hexamoe::expert_mlp", mutates_args=())
def expert_mlp_op(
    x: Tensor, w1: Tensor, w2: Tensor, idx: Tensor, offs: Tensor, k: int, act: str, gated: bool, interleaved: bool,
    b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Token-order ``x[T, d]`` -> ``(y[T, d_out], h[P, F1])``; ``h`` is the pre-activation kept for backward
    (whose buffer the backward may reuse for ``dh``)."""
    check_expert_mlp(x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale)
    return mlp_forward(get_backend(x.device), x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale)


@expert_mlp_op.register_fake
def _(x, w1, w2, idx, offs, k, act, gated, interleaved, b1=None, b2=None, row_scale=None):
    check_expert_mlp(x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale)
    h = x.new_empty(idx.numel(), w1.size(2), dtype=esmm_out_dtype(w1, b1))
    return x.new_empty(x.size(0), w2.size(2)), h


@torch.library.custom_op("hexamoe::expert_mlp_backward", mutates_args=())
def expert_mlp_backward(
    dout: Tensor, x: Tensor, h: Tensor, w1: Tensor, w2: Tensor, idx: Tensor, offs: Tensor, k: int, act: str,
    gated: bool, interleaved: bool, b1: Optional[Tensor], b2: Optional[Tensor], row_scale: Optional[Tensor],
    needs: list[bool],
) -> list[Tensor]:
    """``[dx, dw1, dw2, db1, db2, ds]``; an unwanted or absent one is an empty tensor."""
    grads = mlp_backward(get_backend(dout.device), dout, x, h, w1, w2, idx, offs, k, act, gated, interleaved,
                         b1, b2, row_scale, needs)
    return [g if g is not None else _absent(dout) for g in grads]


@torch.library.custom_op("hexamoe::expert_mlp_backward_", mutates_args=("h",))
def expert_mlp_backward_(
    dout: Tensor, x: Tensor, h: Tensor, w1: Tensor, w2: Tensor, idx: Tensor, offs: Tensor, k: int, act: str,
    gated: bool, interleaved: bool, b1: Optional[Tensor], b2: Optional[Tensor], row_scale: Optional[Tensor],
    needs: list[bool],
) -> list[Tensor]:
    """:func:`expert_mlp_backward` that writes ``dh`` over ``h`` (fp32/fp64): one ``[P, F1]`` buffer fewer at the
    backward's peak. Eager autograd only, when the graph is not kept (``h`` is dead afterwards)."""
    grads = mlp_backward(get_backend(dout.device), dout, x, h, w1, w2, idx, offs, k, act, gated, interleaved,
                         b1, b2, row_scale, needs, reuse_h=True)
    return [g if g is not None else _absent(dout) for g in grads]


@expert_mlp_backward.register_fake
def _mlp_backward_fake(dout, x, h, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale, needs):
    like = (x, w1, w2, b1, b2, row_scale)
    return [_grad_like(t) if want and t is not None else _absent(dout) for t, want in zip(like, needs)]


expert_mlp_backward_.register_fake(_mlp_backward_fake)


def _may_reuse_h(*ts: Tensor) -> bool:
    """True when overwriting the saved ``h`` is unobservable: eager plain tensors, and the graph is freed after
    this backward (``retain_graph``/``create_graph``, e.g. gradcheck, would unpack ``h`` again)."""
    if torch.compiler.is_compiling() or any(type(t) is not Tensor for t in ts):
        return False  # traced graphs keep the functional op: no input mutation in a backward graph
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _mlp_setup(ctx, inputs, output):
    x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale = inputs
    ctx.save_for_backward(x, output[1], w1, w2, b1, b2, row_scale, idx, offs)
    ctx.args = (k, act, gated, interleaved)
    # h is kept for backward only: without these, autograd would allocate and zero-fill a [P, F1] gradient for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _mlp_grad(ctx, dout, _dh_unused):
    if dout is None:  # grads are not materialized: y took no part in the loss
        return (None,) * 12
    x, h, w1, w2, b1, b2, row_scale, idx, offs = ctx.saved_tensors
    n = ctx.needs_input_grad
    wanted = [n[0], n[1], n[2], b1 is not None and n[9], b2 is not None and n[10], row_scale is not None and n[11]]
    op = torch.ops.hexamoe.expert_mlp_backward_ if _may_reuse_h(dout, h) else torch.ops.hexamoe.expert_mlp_backward
    grads = op(dout, x, h, w1, w2, idx, offs, *ctx.args, b1, b2, row_scale, wanted)
    dx, dw1, dw2, db1, db2, ds = _present(grads, wanted)
    return dx, dw1, dw2, None, None, None, None, None, None, db1, db2, ds


expert_mlp_op.register_autograd(_mlp_grad, setup_context=_mlp_setup)


def expert_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    index: ExpertIndex,
    *,
    act: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None,
) -> Tensor:
    """``sum_j s[t, j] * expert_{e[t, j]}(x[t])`` for token-order ``x[T, d]``.

    ``w1``: ``[E, d, F1]`` (``F1 = 2f`` gated, ``[gate; up]`` or interleaved), ``w2``: ``[E, f, d]``;
    pass transformers' ``gate_up_proj.transpose(1, 2)`` and ``down_proj.transpose(1, 2)`` views.
    ``row_scale``: ``[T*k]`` routing weights in pair order (``top_k_weights.reshape(-1)``).
    """
    return expert_mlp_op(x, w1, w2, index.idx, index.offs, index.k, act, gated, interleaved, b1, b2, row_scale)[0]


# ------------------------------------------------------------------------------------------ expert linear
@torch.library.custom_op("hexamoe::expert_linear", mutates_args=())
def expert_linear_op(
    x: Tensor, w: Tensor, idx: Tensor, offs: Tensor, gather_div: Optional[int] = None, scatter: bool = False,
    bias: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
) -> Tensor:
    check_esmm(x, w, idx, offs, gather_div, scatter, bias, row_scale)
    return linear_forward(get_backend(x.device), x, w, idx, offs, gather_div, scatter, bias, row_scale)


expert_linear_op.register_fake(_esmm_fake)  # same operands, same output as ESMM


@torch.library.custom_op("hexamoe::expert_linear_backward", mutates_args=())
def expert_linear_backward(
    dy: Tensor, x: Tensor, w: Tensor, idx: Tensor, offs: Tensor, gather_div: Optional[int], scatter: bool,
    bias: Optional[Tensor], row_scale: Optional[Tensor], needs: list[bool],
) -> list[Tensor]:
    """``[dx, dw, db, ds]``; an unwanted or absent one is an empty tensor."""
    grads = linear_backward(get_backend(dy.device), dy, x, w, idx, offs, gather_div, scatter, bias, row_scale, needs)
    return [g if g is not None else _absent(dy) for g in grads]


@expert_linear_backward.register_fake
def _(dy, x, w, idx, offs, gather_div, scatter, bias, row_scale, needs):
    return [_grad_like(t) if want and t is not None else _absent(dy) for t, want in zip((x, w, bias, row_scale), needs)]


def _linear_setup(ctx, inputs, output):
    x, w, idx, offs, gather_div, scatter, bias, row_scale = inputs
    ctx.save_for_backward(x, w, idx, offs, bias, row_scale)
    ctx.args = (gather_div, scatter)


def _linear_grad(ctx, dy):
    x, w, idx, offs, bias, row_scale = ctx.saved_tensors
    n = ctx.needs_input_grad
    wanted = [n[0], n[1], bias is not None and n[6], row_scale is not None and n[7]]
    grads = torch.ops.hexamoe.expert_linear_backward(dy, x, w, idx, offs, *ctx.args, bias, row_scale, wanted)
    dx, dw, db, ds = _present(grads, wanted)
    return dx, dw, None, None, None, None, db, ds


expert_linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


def expert_linear(
    x: Tensor,
    w: Tensor,
    index: ExpertIndex,
    *,
    gather_div: int | None = None,
    scatter: bool = False,
    bias: Tensor | None = None,
    row_scale: Tensor | None = None,
) -> Tensor:
    """Differentiable expert linear ``[P, N]``: see :func:`ds_hexamoe.ops.torch_ops.esmm` for the row maps."""
    return expert_linear_op(x, w, index.idx, index.offs, gather_div, scatter, bias, row_scale)

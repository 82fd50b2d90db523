"""``torch.library`` registrations of the Triton kernels, so ``torch.compile`` traces code that calls them.

* ``hexamoe::esmm``, ``hexamoe::estmm``, ``hexamoe::ess``: the three operators (same arguments as
  :mod:`ds_hexamoe.ops.torch_ops`), opaque to the compiler, with fake (meta) implementations.
* ``hexamoe::expert_mlp``: the fused expert MLP (first projection, activation, second projection,
  routing-weight scaling, combine over ``k``) with a closed-form backward built on the three ops
  (docs/design.md, "Expert-specific operators"); it mirrors the reference,
  :class:`ds_hexamoe.ops.functions.ExpertMLPFunction`.
  It returns ``(y, h)``; ``h`` is the saved pre-activation. Use :func:`expert_mlp` for ``y`` alone.

Neither forward nor backward makes a host sync, so a compiled graph keeps the ops in one piece.
Tensors on a device the Triton kernels do not serve (CPU without ``TRITON_INTERPRET=1``) run the torch path.
"""
from typing import Optional

import torch
from torch import Tensor

from ds_hexamoe.ops import torch_ops
from ds_hexamoe.ops.activations import get_activation
from ds_hexamoe.ops.routing import ExpertIndex

from . import triton_ops


def backend_for(device: torch.device) -> str:
    """``"triton"`` where the kernels run (GPU, or CPU under the interpreter), ``"torch"`` otherwise."""
    return "triton" if (device.type == "cpu") == triton_ops.INTERPRETED else "torch"


def _ops(device: torch.device):
    return triton_ops if backend_for(device) == "triton" else torch_ops


# ------------------------------------------------------------------------------------------ the three ops
@torch.library.custom_op("hexamoe::esmm", mutates_args=())
def esmm(
    x: Tensor, w: Tensor, idx: Tensor, offs: Tensor, gather_div: Optional[int] = None, scatter: bool = False,
    bias: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
) -> Tensor:
    return _ops(x.device).esmm(x, w, idx, offs, gather_div=gather_div, scatter=scatter, bias=bias, row_scale=row_scale)


@esmm.register_fake
def _(x, w, idx, offs, gather_div=None, scatter=False, bias=None, row_scale=None):
    triton_ops.check_esmm(x, w, idx, offs, gather_div, scatter, bias, row_scale)
    return x.new_empty(idx.numel(), w.size(2), dtype=triton_ops.esmm_out_dtype(w, bias))


@torch.library.custom_op("hexamoe::estmm", mutates_args=())
def estmm(
    x: Tensor, dy: Tensor, idx: Tensor, offs: Tensor, x_div: Optional[int] = None, dy_div: Optional[int] = None,
    dy_scale: Optional[Tensor] = None,
) -> Tensor:
    return _ops(x.device).estmm(x, dy, idx, offs, x_div=x_div, dy_div=dy_div, dy_scale=dy_scale)


@estmm.register_fake
def _(x, dy, idx, offs, x_div=None, dy_div=None, dy_scale=None):
    triton_ops.check_estmm(x, dy, idx, offs, x_div, dy_div, dy_scale)
    return x.new_empty(offs.numel() - 1, x.size(1), dy.size(1))


@torch.library.custom_op("hexamoe::ess", mutates_args=())
def ess(dy: Tensor, idx: Tensor, offs: Tensor, dy_div: Optional[int] = None, dy_scale: Optional[Tensor] = None) -> Tensor:
    return _ops(dy.device).ess(dy, idx, offs, dy_div=dy_div, dy_scale=dy_scale)


@ess.register_fake
def _(dy, idx, offs, dy_div=None, dy_scale=None):
    triton_ops.check_ess(dy, idx, offs, dy_div, dy_scale)
    return dy.new_empty(offs.numel() - 1, dy.size(1))


# ------------------------------------------------------------------------------------ fused expert MLP
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pairs_to_tokens(y: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    # deterministic combine: reshape + fp32 sum, no atomics
    return y.view(-1, k, y.size(-1)).sum(1, dtype=_acc(y.dtype)).to(dtype)


def _split(h: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    f = h.size(1) // 2
    return h[:, :f], h[:, f:]


def _activate(h: Tensor, act: str, gated: bool, interleaved: bool) -> Tensor:
    fn, _ = get_activation(act)
    if not gated:
        return fn(h)
    g, u = _split(h, interleaved)
    return fn(g) * u


def _activate_backward(h: Tensor, da: Tensor, act: str, gated: bool, interleaved: bool) -> Tensor:
    fn, dfn = get_activation(act)
    hf, daf = h.to(_acc(h.dtype)), da.to(_acc(h.dtype))
    if not gated:
        return (daf * dfn(hf)).to(h.dtype)
    g, u = _split(hf, interleaved)
    dg, du = daf * u * dfn(g), daf * fn(g)
    if interleaved:
        return torch.stack((dg, du), dim=-1).flatten(1).to(h.dtype)
    return torch.cat((dg, du), dim=1).to(h.dtype)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    acc = _acc(a.dtype)
    return (a.to(acc) * b.to(acc)).sum(-1)


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
    triton_ops.check_esmm(x, w1, idx, offs, k, False, b1, None)
    if row_scale is not None and (row_scale.dim() != 1 or row_scale.numel() != idx.numel()):
        raise ValueError(f"row_scale must be [T*k={idx.numel()}] routing weights in pair order "
                         f"(top_k_weights.reshape(-1)), got {tuple(row_scale.shape)}")


@torch.library.custom_op("hexamoe::expert_mlp", mutates_args=())
def expert_mlp_op(
    x: Tensor, w1: Tensor, w2: Tensor, idx: Tensor, offs: Tensor, k: int, act: str, gated: bool, interleaved: bool,
    b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Token-order ``x[T, d]`` -> ``(y[T, d_out], h[P, F1])``; ``h`` is the pre-activation kept for backward."""
    check_expert_mlp(x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale)
    h = torch.ops.hexamoe.esmm(x, w1, idx, offs, gather_div=k, bias=b1)
    a = _activate(h, act, gated, interleaved)
    y = torch.ops.hexamoe.esmm(a, w2, idx, offs, scatter=True, bias=b2, row_scale=row_scale)
    return _pairs_to_tokens(y, k, x.dtype), h


@expert_mlp_op.register_fake
def _(x, w1, w2, idx, offs, k, act, gated, interleaved, b1=None, b2=None, row_scale=None):
    check_expert_mlp(x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale)
    h = x.new_empty(idx.numel(), w1.size(2), dtype=triton_ops.esmm_out_dtype(w1, b1))
    return x.new_empty(x.size(0), w2.size(2)), h


def _setup_context(ctx, inputs, output):
    x, w1, w2, idx, offs, k, act, gated, interleaved, b1, b2, row_scale = inputs
    ctx.save_for_backward(x, output[1], w1, w2, b1, b2, row_scale, idx, offs)
    ctx.k, ctx.act, ctx.gated, ctx.interleaved = k, act, gated, interleaved


def _backward(ctx, dout, _dh_unused):
    """Closed form (docs/design.md, "Expert-specific operators") without host syncs: sentinel positions
    are masked, not sliced."""
    x, h, w1, w2, b1, b2, row_scale, idx, offs = ctx.saved_tensors
    k, act, gated, inter = ctx.k, ctx.act, ctx.gated, ctx.interleaved
    need = ctx.needs_input_grad
    ops = torch.ops.hexamoe
    dout = dout.contiguous()
    n_pairs, num_experts = idx.numel(), offs.numel() - 1
    a = _activate(h, act, gated, inter)
    t2 = ops.esmm(dout, w2.transpose(1, 2), idx, offs, gather_div=k)  # dy @ W2^T, unscaled; zero past offs[-1]
    ds = None
    if row_scale is not None:
        pos = torch.arange(n_pairs, device=idx.device)
        valid = pos < offs[-1]
        if need[11]:
            ds_pos = _row_dot(t2, a)
            if b2 is not None:
                eids = torch.searchsorted(offs[1:], pos, right=True).clamp_(max=num_experts - 1)
                dy_rows = dout.index_select(0, torch.div(idx, k, rounding_mode="floor"))
                ds_pos = ds_pos + _row_dot(dy_rows, b2.index_select(0, eids)) * valid
            ds = ds_pos.new_zeros(n_pairs).index_copy_(0, idx, ds_pos).to(row_scale.dtype)
        s = row_scale.index_select(0, idx).to(t2.dtype) * valid
        da = t2 * s.unsqueeze(-1)
    else:
        da = t2
    dw2 = ops.estmm(a, dout, idx, offs, dy_div=k, dy_scale=row_scale).to(w2.dtype) if need[2] else None
    db2 = ops.ess(dout, idx, offs, dy_div=k, dy_scale=row_scale).to(b2.dtype) if b2 is not None and need[10] else None
    dh = _activate_backward(h, da, act, gated, inter)
    dw1 = ops.estmm(x, dh, idx, offs, x_div=k).to(w1.dtype) if need[1] else None
    db1 = ops.ess(dh, idx, offs).to(b1.dtype) if b1 is not None and need[9] else None
    dx = None
    if need[0]:
        dx = _pairs_to_tokens(ops.esmm(dh, w1.transpose(1, 2), idx, offs, scatter=True), k, x.dtype)
    return dx, dw1, dw2, None, None, None, None, None, None, db1, db2, ds


expert_mlp_op.register_autograd(_backward, setup_context=_setup_context)


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
    """Same call as :func:`ds_hexamoe.ops.expert_mlp`, through the ``hexamoe::expert_mlp`` custom op."""
    return expert_mlp_op(x, w1, w2, index.idx, index.offs, index.k, act, gated, interleaved, b1, b2, row_scale)[0]


__all__ = ["esmm", "estmm", "ess", "expert_mlp", "expert_mlp_op", "backend_for", "check_expert_mlp"]

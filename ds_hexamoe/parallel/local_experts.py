"""The local expert computation every parallel path shares, its input checks, and the phase marks that tell
expert work from the rest (the slowdown emulation stretches each by its own factor)."""
from __future__ import annotations

import contextlib

import torch

from ..experts.lora import lora_mlp
from ..ops import build_expert_index, expert_mlp
from ..ops.functions import activate
from ..ops.functions import acc_dtype
from .weights import ExpertSpec, ExpertWeights


def check_routing(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> None:
    """Raise naming the argument when shapes, dtypes or expert ids are wrong (one host sync for the id range)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden: got shape {list(hidden.shape)}; expected [T, d] (flatten batch and sequence first)")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden: got dtype {hidden.dtype}; expected a floating dtype")
    if top_k_index.dim() != 2 or top_k_index.size(0) != hidden.size(0):
        raise ValueError(f"top_k_index: got shape {list(top_k_index.shape)}; expected [T, k] with T = {hidden.size(0)}")
    if top_k_index.is_floating_point() or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index: got dtype {top_k_index.dtype}; expected an integer dtype")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape) or not top_k_weights.is_floating_point():
        raise ValueError(
            f"top_k_weights: got {top_k_weights.dtype} {list(top_k_weights.shape)}; expected floating [T, k] = {list(top_k_index.shape)}"
        )
    if top_k_index.numel():
        lo, hi = torch.stack((top_k_index.min(), top_k_index.max())).tolist()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"top_k_index: ids span [{lo}, {hi}]; expected expert ids in [0, {num_experts})")


# callables ``hook(experts: bool)`` told when expert computation starts (True) and ends (False), in forward
# and in backward; the slowdown emulation (hetero/slowdown.py) registers one to stretch expert work by its
# own factor
PHASE_HOOKS: list = []
_REGION = [0]  # depth of open expert_region()s: inside one, every phase is expert work


def _phase(experts: bool) -> None:
    experts = experts or _REGION[0] > 0
    for hook in PHASE_HOOKS:
        hook(experts)


@contextlib.contextmanager
def expert_region():
    """Everything inside counts as expert work for the phase hooks, ``compute_experts``' own marks included:
    the copies and gradient scatters around the expert GEMMs (materializing experts, taking received rows)
    are MoE-layer work, which a device slow at attention but not at experts does at its expert speed."""
    _REGION[0] += 1
    _phase(True)
    try:
        yield
    finally:
        _REGION[0] -= 1
        _phase(False)


class _PhaseMark(torch.autograd.Function):
    """Identity whose backward announces a phase: at a layer's output, expert backward starts; at its
    input, it ends."""

    @staticmethod
    def forward(ctx, x, experts: bool):
        ctx.experts = experts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _phase(ctx.experts)
        return g, None


def _touch(weights: ExpertWeights) -> torch.Tensor:
    """A zero that depends on every materialized tensor, so their backward (e.g. FSSDP's reduce) always runs."""
    z = weights.w1.sum() * 0 + weights.w2.sum() * 0
    for b in (weights.b1, weights.b2):
        if b is not None:
            z = z + b.sum() * 0
    return z


def compute_experts(
    x: torch.Tensor,
    experts_idx: torch.Tensor,
    row_scale: torch.Tensor | None,
    weights: ExpertWeights,
    spec: ExpertSpec,
    use_b2: bool = True,
) -> torch.Tensor:
    """``[R, d]`` outputs of local experts for rows ``x[R, d]`` routed by ``experts_idx[R, k]``.

    Ids ``>= n_local`` are sentinels (pairs computed elsewhere); ``row_scale [R, k]`` weights the
    pairs (None: unweighted). Empty inputs stay in the autograd graph.
    """
    n_local = weights.w1.size(0)
    empty = x.size(0) == 0 or n_local == 0 or weights.w1.size(2) == 0 or weights.w2.size(1) == 0
    if empty:
        return x * 0 + _touch(weights).to(x.dtype)
    marked = bool(PHASE_HOOKS) and torch.is_grad_enabled()
    if marked:
        x = _PhaseMark.apply(x, False)
    _phase(True)
    index = build_expert_index(experts_idx, n_local)
    rs = None if row_scale is None else row_scale.reshape(-1)
    if weights.lora:  # adapters on the experts: the linears with their low-rank paths, autograd between
        out = lora_mlp(x, weights.w1, weights.w2, index, weights.lora,
                       lambda h: activate(h, spec.act, spec.gated, spec.interleaved),
                       b1=weights.b1, b2=weights.b2 if use_b2 else None, row_scale=rs)
    else:
        out = expert_mlp(
            x, weights.w1, weights.w2, index, act=spec.act, gated=spec.gated, interleaved=spec.interleaved,
            b1=weights.b1, b2=weights.b2 if use_b2 else None, row_scale=rs,
        )
    _phase(False)
    return _PhaseMark.apply(out, True) if marked else out


def scatter_rows_add(n: int, rows: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[n, d]`` with ``out[target[i]] += rows[i]``, accumulated in fp32 for half types."""
    acc = acc_dtype(rows.dtype)
    return rows.new_zeros(n, rows.size(1), dtype=acc).index_add(0, target, rows.to(acc)).to(dtype)

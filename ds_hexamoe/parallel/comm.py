"""Differentiable variable-size collectives: all-to-all-v, all-gather-v and reduce-scatter-v.

Each is one autograd node per call that moves one or more tensors with the same row splits, so the
backward collectives of a layer run in one fixed order on every rank (two independent collective
nodes could be scheduled differently on different ranks and deadlock). Backward of all-to-all-v is the
reverse all-to-all-v; all-gather-v and reduce-scatter-v are each other's backward.

Every collective runs on every rank even when its rows are empty; gradients of unused outputs are
materialized as zeros so the backward collective always happens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import world_and_rank
from .accounting import CallStats

_HALF = (torch.float16, torch.bfloat16)


def _per_row(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n * t.element_size()


def _bytes(t: torch.Tensor, rows_by_rank: list[int], rank: int) -> int:
    """Bytes of ``t``'s rows that travel to (or come from) ranks other than ``rank``."""
    return _per_row(t) * (sum(rows_by_rank) - rows_by_rank[rank])


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Non-differentiable all-to-all-v of rows (for integer metadata)."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    return out


def all_to_all_split_sizes(
    send_counts: list[int], device: torch.device, group=None, stats: CallStats | None = None, check: list[int] | None = None
) -> list[int]:
    """``recv[r]`` = rows rank ``r`` sends to this rank (one small all-to-all).

    ``check`` (e.g. a placement digest and shapes) rides along to every rank; if any rank's differs,
    every rank raises, because every rank receives every other rank's values.
    """
    world, rank = world_and_rank(group)
    check = list(check or [])
    send = torch.tensor([[c] + check for c in send_counts], dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if stats is not None:
        nb = send[0].numel() * send.element_size() * (world - 1)
        stats.record("counts", "all_to_all_v", "forward", nb, nb)
    recv = recv.cpu()
    if check and not bool((recv[:, 1:] == recv[rank, 1:]).all()):
        raise ValueError(
            "placement / top-k / hidden size differ across ranks (rows: [digest, k, d] per rank = "
            f"{recv[:, 1:].tolist()}); pass every rank the same placement and shapes"
        )
    return recv[:, 0].tolist()


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send_splits, recv_splits, group, stats, name, *tensors):
        ctx.splits, ctx.group, ctx.stats, ctx.name = (send_splits, recv_splits), group, stats, name
        _, rank = world_and_rank(group)
        outs = tuple(all_to_all_rows(t, send_splits, recv_splits, group) for t in tensors)
        if stats is not None:
            sent = sum(_bytes(t, send_splits, rank) for t in tensors)
            recv = sum(_bytes(o, recv_splits, rank) for o in outs)
            stats.record(name, "all_to_all_v", "forward", sent, recv)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        send_splits, recv_splits = ctx.splits
        _, rank = world_and_rank(ctx.group)
        back = tuple(all_to_all_rows(g, recv_splits, send_splits, ctx.group) for g in grads)
        if ctx.stats is not None:
            sent = sum(_bytes(g, recv_splits, rank) for g in grads)
            recv = sum(_bytes(b, send_splits, rank) for b in back)
            ctx.stats.record(ctx.name, "all_to_all_v", "backward", sent, recv)
        return (None, None, None, None, None) + back


def all_to_all_v(
    tensors: tuple[torch.Tensor, ...],
    send_splits: list[int],
    recv_splits: list[int],
    group=None,
    stats: CallStats | None = None,
    name: str = "all_to_all",
) -> tuple[torch.Tensor, ...]:
    """Send rows ``[sum(send_splits), ...]`` of each floating tensor; receive ``[sum(recv_splits), ...]``."""
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"all_to_all_v moves floating tensors only (got {t.dtype}); use all_to_all_rows for metadata")
    return _AllToAllV.apply(send_splits, recv_splits, group, stats, name, *tensors)


def gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All-gather of ``x[sizes[rank], ...]`` into ``[sum(sizes), ...]`` (padded to the largest chunk: gloo needs equal sizes)."""
    world, rank = world_and_rank(group)
    t_max = max(sizes) if sizes else 0
    pad = x.new_zeros((t_max,) + tuple(x.shape[1:]))
    pad[: x.size(0)] = x
    bufs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad, group=group)
    return torch.cat([b[:n] for b, n in zip(bufs, sizes)], 0)


def reduce_scatter_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Sum over ranks of ``x[sum(sizes), ...]``; this rank keeps rows ``sizes[rank]`` of its block.

    fp32/fp64 use the reduce-scatter collective; half types go through an all-to-all (same bytes)
    and a local fp32 sum in rank order, so partial outputs are never accumulated in bf16.
    """
    world, rank = world_and_rank(group)
    x = x.contiguous()
    if x.dtype in _HALF:
        recv = all_to_all_rows(x, sizes, [sizes[rank]] * world, group)
        return recv.view((world, sizes[rank]) + tuple(x.shape[1:])).sum(0, dtype=torch.float32).to(x.dtype)
    out = x.new_empty((sizes[rank],) + tuple(x.shape[1:]))
    dist.reduce_scatter(out, list(x.split(sizes, 0)), group=group)
    return out


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sizes, group, stats, name, *tensors):
        ctx.sizes, ctx.group, ctx.stats, ctx.name = sizes, group, stats, name
        world, rank = world_and_rank(group)
        outs = tuple(gather_rows(t, sizes, group) for t in tensors)
        if stats is not None:  # gloo's all-gather moves chunks padded to the largest
            padded = [max(sizes)] * world
            sent = sum(_bytes(t, padded, rank) for t in tensors)
            recv = sum(_bytes(o, padded, rank) for o in outs)
            stats.record(name, "all_gather", "forward", sent, recv)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        world, rank = world_and_rank(ctx.group)
        back = tuple(reduce_scatter_rows(g, ctx.sizes, ctx.group) for g in grads)
        if ctx.stats is not None:
            sent = sum(_bytes(g, ctx.sizes, rank) for g in grads)
            recv = sum(_bytes(b, [b.size(0)] * world, rank) for b in back)
            ctx.stats.record(ctx.name, "reduce_scatter", "backward", sent, recv)
        return (None, None, None, None) + back


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sizes, group, stats, name, x):
        ctx.sizes, ctx.group, ctx.stats, ctx.name = sizes, group, stats, name
        world, rank = world_and_rank(group)
        out = reduce_scatter_rows(x, sizes, group)
        if stats is not None:
            stats.record(name, "reduce_scatter", "forward", _bytes(x, sizes, rank), _bytes(out, [out.size(0)] * world, rank))
        return out

    @staticmethod
    def backward(ctx, g):
        world, rank = world_and_rank(ctx.group)
        full = gather_rows(g.contiguous(), ctx.sizes, ctx.group)
        if ctx.stats is not None:
            padded = [max(ctx.sizes)] * world
            ctx.stats.record(ctx.name, "all_gather", "backward", _bytes(g, padded, rank), _bytes(full, padded, rank))
        return None, None, None, None, full


def all_gather_v(
    tensors: tuple[torch.Tensor, ...], sizes: list[int], group=None, stats: CallStats | None = None, name: str = "gather"
) -> tuple[torch.Tensor, ...]:
    """Concatenate every rank's rows (``sizes[r]`` from rank ``r``); backward reduce-scatters the gradient."""
    return _AllGatherV.apply(sizes, group, stats, name, *tensors)


def reduce_scatter_v(
    x: torch.Tensor, sizes: list[int], group=None, stats: CallStats | None = None, name: str = "reduce_scatter"
) -> torch.Tensor:
    """Sum ``x[sum(sizes), ...]`` over ranks, keeping this rank's ``sizes[rank]`` rows; backward all-gathers."""
    return _ReduceScatterV.apply(sizes, group, stats, name, x)

"""Sparse collectives of FSSDP: SparseAllGather (owners -> users) and SparseReduceScatter (users -> owners).

Each moves only the experts some rank's tokens activated, each expert only between its owner and the
ranks that used it (Hecate), as one ``all_to_all_single`` with variable splits (works on gloo and NCCL).
When no expert moves anywhere (every rank's data is already local) the collective is skipped on all
ranks alike, which every rank can tell from the exchanged masks. With ``fanout`` ``"tree"`` (or
``"auto"`` once some expert goes to 3 or more ranks) an exchange runs as broadcast/reduce trees
(:mod:`.tree`): every rank decides alike from the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.accounting import CommStats
from .layer import ExpertLayer
from .ownership import LayerOwnership
from .transport import Pending, exchange
from .tree import advance_trees, max_fanout, tree_all_gather, tree_reduce_scatter, use_tree

__all__ = ["Pending", "Transfer", "UsedLater", "all_gather_loads", "all_gather_loads_async", "plan_transfer",
           "sparse_all_gather", "sparse_reduce_scatter"]


@dataclass(frozen=True)
class Transfer:
    """This rank's part of one layer's sparse exchange, derived from everyone's active masks.

    ``sends[q]``: experts this rank owns that rank ``q`` used; ``recvs[o]``: experts rank ``o`` owns
    that this rank used. A gather moves weights along ``sends``; the reduce-scatter moves gradients
    back along ``recvs``. ``local``: owned experts this rank used itself. ``masks``: every rank's masks
    (the trees need them); ``widest``: the most ranks other than its owner one expert goes to.
    """

    sends: tuple[tuple[int, ...], ...]
    recvs: tuple[tuple[int, ...], ...]
    local: tuple[int, ...]
    moves: bool
    masks: tuple[tuple[bool, ...], ...] = ()
    widest: int = 0


def plan_transfer(ownership: LayerOwnership, masks: list[list[bool]], rank: int) -> Transfer:
    n = ownership.world_size
    sends = tuple(tuple(e for e in ownership.owned(rank) if masks[q][e]) if q != rank else () for q in range(n))
    recvs = tuple(tuple(e for e in ownership.owned(o) if masks[rank][e]) if o != rank else () for o in range(n))
    local = tuple(e for e in ownership.owned(rank) if masks[rank][e])
    moves = any(masks[q][e] for o in range(n) for e in ownership.owned(o) for q in range(n) if q != o)
    return Transfer(sends=sends, recvs=recvs, local=local, moves=moves,
                    masks=tuple(tuple(bool(x) for x in m) for m in masks), widest=max_fanout(ownership, masks))


def all_gather_loads(counts_e: torch.Tensor, group, stats: CommStats) -> list[list[int]]:
    """All ranks' expert loads ``[N][E]`` (tokens per expert; one all_gather of ``4E`` bytes per rank):
    the active masks and the load history in one collective."""
    return all_gather_loads_async(counts_e, group, stats).wait()


def all_gather_loads_async(counts_e: torch.Tensor, group, stats: CommStats) -> Pending:
    """:func:`all_gather_loads` issued asynchronously: a :class:`Pending` whose ``wait()`` gives ``[N][E]``."""
    advance_trees(group)
    n = dist.get_world_size(group)
    c = counts_e.to(device="cpu", dtype=torch.int32).contiguous()
    out = [torch.empty_like(c) for _ in range(n)]
    work = dist.all_gather(out, c, group=group, async_op=True)
    stats.mask_bytes += 4 * c.numel() * (n - 1)
    return Pending(work, lambda keep=c: [t.tolist() for t in out], stats, "loads")


class UsedLater:
    """The :class:`Transfer` of the experts each rank used, known once an asynchronous load exchange is in:
    built on first use (backward's re-gather and reduce), with the ownership of the forward."""

    def __init__(self, loads: Pending, ownership: LayerOwnership, rank: int):
        self._loads, self._ownership, self._rank, self._transfer = loads, ownership, rank, None

    def resolve(self) -> Transfer:
        if self._transfer is None:
            used = [[c > 0 for c in row] for row in self._loads.wait()]
            self._transfer = plan_transfer(self._ownership, used, self._rank)
        return self._transfer

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)


def sparse_all_gather(
    layer: ExpertLayer, transfer: Transfer, full: dict[str, torch.Tensor], group, stats: CommStats,
    *, kind: str = "gather_bytes", async_op: bool = False, fanout: str = "direct",
) -> Pending:
    """Materialize every expert this rank used into the full-layer views ``full`` (owned ones by a local copy).
    ``kind``: the :class:`CommStats` field the bytes count into; ``fanout``: ``fssdp.fanout``."""
    advance_trees(group)
    if transfer.local:
        layer.unpack_into(full, list(transfer.local), layer.pack_local(list(transfer.local)))
    if not transfer.moves:
        stats.skipped += 1
        return Pending(None, lambda: None)
    what = kind.replace("_bytes", "") + ("_ahead" if async_op and kind == "gather_bytes" else "")
    if use_tree(fanout, transfer.widest):
        return tree_all_gather(layer, transfer.masks, full, group, stats, kind=kind, what=what, async_op=async_op)
    width, dtype = layer.numel_per_expert, layer.dtype
    send_lists = [list(s) for s in transfer.sends]
    flat_send = [e for s in send_lists for e in s]
    rows = layer.pack_local(flat_send) if flat_send else torch.empty(0, width, dtype=dtype, device=layer.device)
    send_counts = [len(s) for s in send_lists]
    recv_counts = [len(r) for r in transfer.recvs]
    recv, send, work = exchange(rows, send_counts, recv_counts, width, dtype, layer.device, group, async_op, stats, what)
    stats.collectives += 1
    esize = torch.empty(0, dtype=dtype).element_size()
    stats.count_sent(layer.index, transfer.sends, width * esize, kind)
    stats.recv_bytes += recv.numel() * esize
    flat_recv = [e for r in transfer.recvs for e in r]

    def finish():
        nonlocal send
        send = None  # the send buffer had to live until the exchange completed
        if flat_recv:
            layer.unpack_into(full, flat_recv, recv.view(len(flat_recv), width))

    nbytes = max(sum(send_counts), sum(recv_counts)) * width * esize
    return Pending(work if async_op else None, finish, stats, what, nbytes)


def sparse_reduce_scatter(
    layer: ExpertLayer, transfer: Transfer, grads: dict[str, torch.Tensor | None], group, stats: CommStats,
    *, async_op: bool = False, acc_dtype: torch.dtype = torch.float32, fanout: str = "direct",
) -> Pending:
    """Send each used expert's gradient to its owner; the result is ``{name: [E_local, ...]}`` (``acc_dtype``),
    the sum over all ranks that used the expert (zeros for experts nobody used), or None when nothing is owned.
    ``fanout``: ``fssdp.fanout`` (a tree sums partial gradients on the way)."""
    advance_trees(group)
    if transfer.moves and use_tree(fanout, transfer.widest):
        return tree_reduce_scatter(layer, transfer.masks, grads, group, stats, async_op=async_op, acc_dtype=acc_dtype)
    width = layer.grad_numel_per_expert
    ref = next((g for g in grads.values() if g is not None), None)
    wire = ref.dtype if ref is not None else layer.dtype
    device = layer.device
    local = list(transfer.local)
    local_rows = layer.pack_grads(grads, local, acc_dtype) if local else None
    if transfer.moves:
        recv_lists = [list(r) for r in transfer.recvs]
        flat = [e for r in recv_lists for e in r]
        rows = layer.pack_grads(grads, flat, wire) if flat else torch.empty(0, width, dtype=wire, device=device)
        # gradients travel back along the gather's routes, reversed
        recv, send, work = exchange(rows, [len(r) for r in recv_lists], [len(s) for s in transfer.sends],
                                     width, wire, device, group, async_op, stats, "reduce")
        stats.collectives += 1
        esize = torch.empty(0, dtype=wire).element_size()
        stats.count_sent(layer.index, transfer.recvs, width * esize, "reduce_bytes")
        stats.recv_bytes += recv.numel() * esize
    else:
        stats.skipped += 1
        recv, send, work = None, None, None

    def finish():
        nonlocal send
        send = None
        count = layer.local_count
        if count == 0:
            return None
        acc = torch.zeros(count, width, dtype=acc_dtype, device=device)
        if local:
            acc.index_add_(0, layer.local_rows(local), local_rows)
        if recv is not None and recv.numel():
            off = 0
            for experts in transfer.sends:  # rank order: a fixed summation order on every run
                if experts:
                    block = recv[off:off + len(experts) * width].view(len(experts), width).to(acc_dtype)
                    acc.index_add_(0, layer.local_rows(experts), block)
                    off += len(experts) * width
        return layer.split_grad_rows(acc)

    return Pending(work if async_op else None, finish, stats, "reduce")

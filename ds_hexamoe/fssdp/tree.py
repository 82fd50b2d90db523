"""Broadcast and reduce trees for FSSDP's sparse collectives (``fssdp.fanout``), as Hecate's grouped
broadcasts: an expert its owner sends to ``R`` ranks does not leave as ``R`` copies on the owner's link.

Binomial doubling: the expert's tree is its owner followed by the ranks that need it (increasing rank);
in round ``k`` every tree node ``i < 2**k`` that holds the expert forwards it to node ``i + 2**k``. After
``ceil(log2(R+1))`` rounds all ``R`` have it, and the owner sent that many copies. Gradients come back on
the same tree reversed: each rank adds what its children sent to its own gradient (fp32 partial sums)
and forwards the sum to its parent, so the owner receives ``ceil(log2(R+1))`` partial sums, not ``R``.

One round is one ``all_to_all_single`` over every expert of the layer (trees with fewer rounds are done
early). A round forwards what the previous one delivered, so round ``k + 1`` can only be issued once
round ``k`` has landed. An asynchronous tree issues its first round at once; each later round is issued,
asynchronously too, at the next sparse exchange or load exchange on the same process group
(:func:`advance_trees`, called by :mod:`.collectives` at every such issue point), and whatever is left
runs when the tree is waited for. Exchanges on one group are issued in the same order on every rank, so
every rank issues the rounds in the same order, and a tree issued ahead of attention overlaps all its
rounds with the compute between its issue and its wait instead of only the first.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.accounting import CommStats, blocked
from .layer import ExpertLayer
from .ownership import LayerOwnership
from .transport import Pending, exchange

FANOUTS = ("direct", "tree", "auto")
AUTO_MIN_FANOUT = 3  # "auto": a tree once some expert goes to this many ranks (fewer: one round equals direct)


@dataclass(frozen=True)
class Round:
    """This rank's part of one tree round: ``sends[q]`` experts it sends to rank ``q``, ``recvs[p]`` experts
    it receives from rank ``p`` (increasing expert ids)."""

    sends: tuple[tuple[int, ...], ...]
    recvs: tuple[tuple[int, ...], ...]


def max_fanout(ownership: LayerOwnership, masks) -> int:
    """The largest number of ranks other than its owner that one expert goes to."""
    n = ownership.world_size
    return max((sum(1 for q in range(n) if q != ownership.owner(e) and masks[q][e])
                for e in range(ownership.num_experts)), default=0)


def use_tree(fanout: str, widest: int) -> bool:
    """Whether an exchange whose widest expert goes to ``widest`` ranks runs as a tree under ``fanout``."""
    return widest > 0 and (fanout == "tree" or (fanout == "auto" and widest >= AUTO_MIN_FANOUT))


def broadcast_rounds(ownership: LayerOwnership, masks, rank: int) -> list[Round]:
    """Rank ``rank``'s part of every round of the binomial broadcast of each expert to the ranks whose
    ``masks[q][e]`` is set (the same number of rounds on every rank; the reduce runs them reversed)."""
    n = ownership.world_size
    sends: list[list[list[int]]] = []
    recvs: list[list[list[int]]] = []
    for e in range(ownership.num_experts):
        o = ownership.owner(e)
        nodes = [o] + [q for q in range(n) if q != o and masks[q][e]]
        k = 0
        while (1 << k) < len(nodes):
            if len(sends) <= k:
                sends.append([[] for _ in range(n)])
                recvs.append([[] for _ in range(n)])
            step = 1 << k
            for i in range(min(step, len(nodes) - step)):
                src, dst = nodes[i], nodes[i + step]
                if src == rank:
                    sends[k][dst].append(e)
                if dst == rank:
                    recvs[k][src].append(e)
            k += 1
    return [Round(tuple(map(tuple, s)), tuple(map(tuple, r))) for s, r in zip(sends, recvs)]


class _Rounds(Pending):
    """Tree rounds run in order: the first issued at construction (asynchronously if asked), each later one
    issued asynchronously by :meth:`advance` (at the group's next exchange), the rest inside :meth:`wait`.
    ``issue(k, async_op) -> (work, land)``; ``land()`` consumes round ``k``'s received rows; ``result()`` is
    the value of :meth:`wait`."""

    def __init__(self, issue: Callable, rounds: int, result: Callable, stats: CommStats, what: str, async_op: bool,
                 nbytes: int, group):
        self._issue, self._rounds, self._result_fn = issue, rounds, result
        self._next = 1  # the next round to issue
        work, self._land = issue(0, async_op)
        super().__init__(work if async_op else None, self._rest, stats, what, nbytes)
        if async_op and rounds > 1:
            _IN_FLIGHT.append((_key(group), weakref.ref(self)))

    @property
    def rounds_left(self) -> bool:
        """Whether rounds remain to issue (none once waited for)."""
        return not self._done and self._next < self._rounds

    def advance(self) -> None:
        """Land the round in flight and issue the next one asynchronously (nothing once all were issued)."""
        if not self.rounds_left:
            return
        if self._work is not None:
            with blocked(self._stats, self._what):
                self._work.wait()
        self._land()
        self._work, self._land = self._issue(self._next, True)
        self._next += 1
        self._stats.tree_rounds_ahead += 1

    def _rest(self):
        self._land()
        for k in range(self._next, self._rounds):
            _, land = self._issue(k, False)
            land()
        return self._result_fn()


# asynchronous trees with rounds left to issue, in issue order, with their process group
_IN_FLIGHT: list[tuple[object, weakref.ref]] = []


def _key(group):
    return group if group is not None else dist.group.WORLD


def advance_trees(group) -> None:
    """Issue the next round of every asynchronous tree in flight on ``group`` (in the order the trees were
    issued). Called at each exchange issued on ``group``: a point every rank of it reaches in the same
    order. Only that group: FSSDP keeps collectives whose order across ranks may differ (backward's
    reduces against its re-gathers) on separate groups, so a round must not ride on another group's."""
    if not _IN_FLIGHT:
        return
    key = _key(group)
    live = []
    for g, ref in _IN_FLIGHT:
        tree = ref()
        if tree is None or not tree.rounds_left:
            continue
        if g is key:
            tree.advance()
        if tree.rounds_left:
            live.append((g, ref))
    _IN_FLIGHT[:] = live


def _link_bytes(rounds: list[Round], bytes_per_expert: int) -> int:
    sent = sum(len(s) for r in rounds for s in r.sends)
    got = sum(len(s) for r in rounds for s in r.recvs)
    return max(sent, got) * bytes_per_expert


def tree_all_gather(layer: ExpertLayer, masks, full: dict[str, torch.Tensor], group, stats: CommStats, *,
                    kind: str, what: str, async_op: bool) -> Pending:
    """The experts ``masks[rank]`` marks (not owned here) written into ``full``, each broadcast down its tree.
    ``kind``: the :class:`CommStats` field the bytes sent count into (forwarded copies included)."""
    rounds = broadcast_rounds(layer.ownership, masks, layer.rank)
    width, dtype, device = layer.numel_per_expert, layer.dtype, layer.device
    esize = torch.empty(0, dtype=dtype).element_size()
    mine = sorted({e for r in rounds for s in r.sends for e in s if layer.ownership.owner(e) == layer.rank})
    have = dict(zip(mine, layer.pack_local(mine))) if mine else {}  # expert -> row this rank can forward
    stats.trees += 1
    stats.tree_rounds += len(rounds)

    def issue(k: int, async_k: bool):
        r = rounds[k]
        rows = [have[e] for s in r.sends for e in s]
        send_rows = torch.stack(rows) if rows else torch.empty(0, width, dtype=dtype, device=device)
        recv, send, work = exchange(send_rows, [len(s) for s in r.sends], [len(x) for x in r.recvs], width, dtype,
                                    device, group, async_k, stats, what)
        stats.collectives += 1
        stats.count_sent(layer.index, r.sends, width * esize, kind)
        stats.recv_bytes += recv.numel() * esize

        def land():
            nonlocal send
            send = None  # the send buffer had to live until the round completed
            flat = [e for x in r.recvs for e in x]
            if flat:
                got = recv.view(len(flat), width)
                have.update(zip(flat, got))
                layer.unpack_into(full, flat, got)

        return work, land

    return _Rounds(issue, len(rounds), lambda: None, stats, what, async_op, _link_bytes(rounds, width * esize),
                   group)


def tree_reduce_scatter(layer: ExpertLayer, masks, grads: dict[str, torch.Tensor | None], group, stats: CommStats, *,
                        async_op: bool, acc_dtype: torch.dtype) -> Pending:
    """Each used expert's gradient summed up its tree to the owner (partial sums in ``acc_dtype`` on the
    ranks, the gradients' dtype on the wire). Waits to ``{name: [E_local, ...]}`` like the direct reduce."""
    rank, own = layer.rank, layer.ownership
    rounds = [Round(sends=r.recvs, recvs=r.sends) for r in reversed(broadcast_rounds(own, masks, rank))]
    width, device = layer.grad_numel_per_expert, layer.device
    ref = next((g for g in grads.values() if g is not None), None)
    wire = ref.dtype if ref is not None else layer.dtype
    esize = torch.empty(0, dtype=wire).element_size()
    used = [e for e in range(own.num_experts) if masks[rank][e]]
    partial = dict(zip(used, layer.pack_grads(grads, used, acc_dtype))) if used else {}
    stats.trees += 1
    stats.tree_rounds += len(rounds)

    def issue(k: int, async_k: bool):
        r = rounds[k]
        rows = [partial[e].to(wire) for s in r.sends for e in s]
        send_rows = torch.stack(rows) if rows else torch.empty(0, width, dtype=wire, device=device)
        recv, send, work = exchange(send_rows, [len(s) for s in r.sends], [len(x) for x in r.recvs], width, wire,
                                    device, group, async_k, stats, "reduce")
        stats.collectives += 1
        stats.count_sent(layer.index, r.sends, width * esize, "reduce_bytes")
        stats.recv_bytes += recv.numel() * esize

        def land():
            nonlocal send
            send = None
            flat = [e for x in r.recvs for e in x]  # children in rank order: a fixed summation order
            for e, row in zip(flat, recv.view(len(flat), width) if flat else ()):
                base = partial.get(e)
                partial[e] = row.to(acc_dtype) if base is None else base + row.to(acc_dtype)

        return work, land

    def result():
        if layer.local_count == 0:
            return None
        acc = torch.zeros(layer.local_count, width, dtype=acc_dtype, device=device)
        for e in own.owned(rank):
            if e in partial:
                acc[own.row(e)] = partial[e]
        return layer.split_grad_rows(acc)

    return _Rounds(issue, len(rounds), result, stats, "reduce", async_op, _link_bytes(rounds, width * esize),
                   group)

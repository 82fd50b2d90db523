"""The zebra pipeline's transport and expert hosting (docs/modes.md, "Zebra"), on any device.

**Ordering discipline (NCCL's rules, also kept on gloo).** NCCL ignores tags: point-to-point messages of
one pair match in the order they are posted, and the sends and receives of one pair of one group run in
order on one stream, so a pair whose group carries both directions can deadlock (each side's send waits
for a receive queued behind the other side's send). Hence four groups, one per (traffic, direction):
``dispatch`` (attention rank -> expert host: row counts, tokens, expert slots, output gradients) and
``combine`` (host -> attention rank: outputs, input gradients), each split into ``up`` (lower rank to
higher) and ``down``. Each (group, pair) then carries one direction, and both sides walk one fixed
(pass, layer, micro-batch, attention rank) order, so the i-th send of a pair meets its i-th receive. Every
message carries tag 0 on every backend, so on gloo (which does match tags) a change that breaks the order
fails the CPU tests (a size mismatch or a wrong result) as it would hang or corrupt NCCL. Dispatch and
combine stay apart: an attention rank that also hosts experts posts its combine receive for micro-batch
``j`` before it serves its peers' dispatch of ``j``, the peer sends them the other way round.

**Connections.** NCCL creates a pair's communicator at the pair's first message, blocking until both
ranks reach it; two ranks whose first messages are on different groups would wait for each other forever.
So :class:`Wire` connects every (group, attention rank, host) pair at construction, all ranks walking one
global order with a one-element message, which cannot deadlock (the earliest pair not yet connected has
both its ranks waiting on it).

**Devices.** The backend follows the model's device (``nccl`` for CUDA, gloo for CPU); every tensor that
travels is on that device. On NCCL each group's point-to-point traffic runs on the communicator's own
stream, so dispatch and combine run beside the compute stream, which waits only where it reads a buffer
(``work.wait()``). Receive buffers come from a pool keyed by (what, layer, micro-batch, peer), grown when a
count exceeds them and reused by every later step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .weights import ExpertWeights


def stack_device(model) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the stack's parameters held on this rank (dense ones first); the parts a rank does not
    hold are meta placeholders (an expert rank's attention weights), which say nothing about its device."""
    params = [p for p in (*model.dense_parameters(), *model.expert_parameters()) if p.device.type != "meta"]
    return params[0].device, params[0].dtype


def backend_for(device: torch.device) -> str:
    """The process-group backend for tensors on ``device`` (``nccl`` on CUDA, ``gloo`` on CPU)."""
    return dist.get_default_backend_for_device(device)


class Wire:
    """Point-to-point traffic of one pipeline: four one-directional groups, tag 0, pooled receive buffers."""

    KINDS = ("dispatch", "combine")

    def __init__(self, world: int, device: torch.device, pairs: list[tuple[int, int]]):
        """``pairs``: the (attention rank, host) pairs that exchange messages, the same list on every rank."""
        self.device, self.backend = device, backend_for(device)
        ranks = list(range(world))
        # creation is collective: the same order on every rank
        self.groups = {(k, up): dist.new_group(ranks, backend=self.backend) for k in self.KINDS for up in (True, False)}
        self._pool: dict = {}
        self._works: list = []  # (work, tensor): a send's tensor lives until its work is done
        self._connect(pairs)

    def _connect(self, pairs: list[tuple[int, int]]) -> None:
        me, one = dist.get_rank(), torch.zeros(1, device=self.device)
        for kind in self.KINDS:
            for a, h in sorted(pairs):
                src, dst = (a, h) if kind == "dispatch" else (h, a)
                if me == src:
                    dist.send(one, dst, group=self._group(kind, src, dst), tag=0)
                elif me == dst:
                    dist.recv(one, src, group=self._group(kind, src, dst), tag=0)

    def _group(self, kind: str, src: int, dst: int):
        return self.groups[(kind, src < dst)]

    def send(self, t: torch.Tensor, src: int, dst: int, kind: str) -> None:
        t = t.contiguous()
        self._works.append((dist.isend(t, dst, group=self._group(kind, src, dst), tag=0), t))

    def recv(self, buf: torch.Tensor, src: int, dst: int, kind: str) -> torch.Tensor:
        dist.recv(buf, src, group=self._group(kind, src, dst), tag=0)
        return buf

    def irecv(self, buf: torch.Tensor, src: int, dst: int, kind: str):
        return dist.irecv(buf, src, group=self._group(kind, src, dst), tag=0)

    def buffer(self, key, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``[rows, cols]`` receive buffer for ``key``, reused across steps."""
        n = rows * cols
        flat = self._pool.get((key, dtype))
        if flat is None or flat.numel() < n:
            flat = self._pool[(key, dtype)] = torch.empty(max(n, 1), dtype=dtype, device=self.device)
        return flat[:n].view(rows, cols).detach()

    def count(self, key) -> torch.Tensor:
        return self.buffer(("n", key), 1, 1, torch.int64).view(1)

    def finish(self) -> None:
        for w, _ in self._works:
            w.wait()
        self._works.clear()


class ExpertHost:
    """The expert work of one rank that hosts experts, within one step: its experts of a layer materialized
    once (one copy, one gradient scatter per layer, not one per message), one detached ``(x, w) -> y`` per
    served (layer, micro-batch, attention rank), the parameters' gradients written by :meth:`finish`."""

    def __init__(self, model, hosted: dict[int, list[int]]):
        self.model, self.hosted = model, hosted  # layer -> global expert ids hosted here
        self._mats: dict = {}
        self._done: dict = {}

    def _weights(self, layer: int) -> ExpertWeights:
        if layer not in self._mats:
            full = self.model.experts_of(layer, self.hosted[layer])
            self._mats[layer] = (full, ExpertWeights(full.w1.detach().requires_grad_(True),
                                                     full.w2.detach().requires_grad_(True)))
        return self._mats[layer][1]

    def forward(self, key: tuple, x: torch.Tensor, w: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
        """Outputs of the rows ``x`` (weights ``w``, local expert slots; ``len(hosted)``: not here); ``key``
        starts with the layer."""
        x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        layer = key[0]
        y = self.model.expert_segment(layer, self.hosted[layer], x, local_idx, w, self._weights(layer))
        self._done[key] = (x, w, y)
        return y.detach()

    def served(self, key: tuple) -> bool:
        return key in self._done

    def out_shape(self, key: tuple) -> tuple[int, int]:
        return tuple(self._done[key][2].shape)

    def backward(self, key: tuple, gy: torch.Tensor) -> torch.Tensor:
        """``[dx | dw]`` of the rows served under ``key`` for output gradients ``gy``."""
        x, w, y = self._done.pop(key)
        torch.autograd.backward(y, gy)
        return torch.cat((x.grad, w.grad), 1)

    def finish(self) -> None:
        for full, leaf in self._mats.values():
            if leaf.w1.grad is not None:
                torch.autograd.backward([full.w1, full.w2], [leaf.w1.grad, leaf.w2.grad])
        self._mats.clear()

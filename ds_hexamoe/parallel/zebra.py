"""Attention/expert disaggregation with the zebra pipeline (HeterMoE; docs/modes.md, "Zebra").

Attention ranks hold the dense part and a batch share; expert ranks (batch share 0) hold whole experts,
and with HeterMoE's Asym-EA attention ranks host whole experts too, per layer. Each attention rank cuts
its share into ``micro_batches`` and walks them layer by layer: after the attention segment of micro-batch
``j`` it posts that micro-batch's tokens to the ranks hosting their experts (computing its own hosted ones
in place) and goes on to micro-batch ``j+1``, so attention of ``j+1`` runs while the expert ranks process
``j``; an attention rank that hosts experts serves its peers' tokens of ``j`` right after posting its own.
Backward mirrors it: output gradients of ``j`` go out, the backward of ``j+1``'s segment runs meanwhile.

Traffic, devices and the order that keeps it correct under NCCL's rules: :mod:`.zebra_wire`.

Exactness: each segment is differentiated on its own from detached inputs, with the received
gradients; per pair the math is the single-process math, so training equals one process up to the
order of floating-point sums (``tests/test_zebra.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..apportion import share_bounds
from .local_experts import expert_region, scatter_rows_add
from .zebra_wire import ExpertHost, Wire, stack_device


@dataclass(frozen=True)
class ZebraLayout:
    """Who does what: ``shares[i]`` samples on ``attention_ranks[i]``; expert ``e`` on ``expert_owner[e]`` in
    every layer, or on ``expert_owner[l][e]`` in layer ``l`` (one tuple per layer, as Asym-EA places them).
    Any rank may host experts, attention ranks included; a rank that does not attend must host some."""

    attention_ranks: tuple[int, ...]
    shares: tuple[int, ...]
    expert_owner: tuple
    micro_batches: int = 2

    @property
    def per_layer(self) -> bool:
        return bool(self.expert_owner) and isinstance(self.expert_owner[0], (tuple, list))

    def owners(self, layer: int) -> tuple[int, ...]:
        """Each expert's host in ``layer``."""
        return tuple(self.expert_owner[layer] if self.per_layer else self.expert_owner)

    def _rows(self) -> list[tuple]:
        return [tuple(o) for o in self.expert_owner] if self.per_layer else [tuple(self.expert_owner)]

    def check(self, world: int, num_experts: int, layers: int | None = None) -> None:
        """Raise naming the ``zebra.*`` field and the fix, before any work."""
        att = list(self.attention_ranks)
        if not att or len(set(att)) != len(att) or any(not 0 <= r < world for r in att):
            raise ValueError(f"zebra.attention_ranks: got {att}; expected distinct ranks in [0, {world})")
        if len(self.shares) != len(att) or any(not isinstance(s, int) or s < self.micro_batches for s in self.shares):
            raise ValueError(f"zebra.shares: got {list(self.shares)}; expected one integer >= micro_batches "
                             f"({self.micro_batches}) per attention rank")
        rows = self._rows()
        if self.per_layer and layers is not None and len(rows) != layers:
            raise ValueError(f"zebra.expert_owner: got {len(rows)} per-layer rows; expected one per layer ({layers}) "
                             "or one flat list for every layer")
        for row in rows:
            if len(row) != num_experts or any(not isinstance(r, int) or not 0 <= r < world for r in row):
                raise ValueError(f"zebra.expert_owner: got {list(row)}; expected one rank in [0, {world}) per expert "
                                 f"({num_experts})")
        idle = [r for r in range(world) if r not in att and r not in self.hosts]
        if idle:
            raise ValueError(f"zebra.expert_owner: ranks {idle} neither attend nor host an expert; give each of them "
                             "experts (expert_owner) or a batch share (attention_ranks, shares)")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"zebra.micro_batches: got {self.micro_batches!r}; expected an integer >= 1 (2 or more to overlap)")

    @property
    def hosts(self) -> list[int]:
        """Every rank that hosts an expert in some layer."""
        return sorted({r for row in self._rows() for r in row})

    @property
    def expert_ranks(self) -> list[int]:
        """The ranks that host experts and do not attend."""
        return [r for r in self.hosts if r not in self.attention_ranks]

    def hosted(self, rank: int, layer: int | None = None) -> list[int]:
        """Experts ``rank`` hosts in ``layer`` (any layer when the owners are the same in all)."""
        if layer is None and self.per_layer:
            raise ValueError("zebra.expert_owner differs per layer: ask hosted(rank, layer)")
        return [e for e, r in enumerate(self.owners(layer or 0)) if r == rank]

    def rows(self, rank: int) -> slice:
        """The samples of each global micro-batch that ``rank`` attends (empty on an expert rank)."""
        i = self.share_index(rank)
        return slice(0, 0) if i is None else slice(*share_bounds(self.shares, i))

    def share_index(self, rank: int) -> int | None:
        """``rank``'s position in ``shares`` (None on an expert rank)."""
        return self.attention_ranks.index(rank) if rank in self.attention_ranks else None


@dataclass
class _Seg:
    """One (layer, micro-batch) attention segment: its detached inputs, outputs and what it sent."""

    h_in: torch.Tensor | None = None
    y_in: dict = field(default_factory=dict)  # host rank -> received output rows (leaves)
    h_out: torch.Tensor | None = None
    sent: dict = field(default_factory=dict)  # host rank -> (token ids, x rows, w rows) as sent, non-empty only
    recv: dict = field(default_factory=dict)  # host rank -> (y buffer, work)
    loss: torch.Tensor | None = None


class ZebraPipeline:
    """One rank's side of disaggregated training; call :meth:`step` on every rank in the same order.

    Build it on every rank after ``init_process_group`` (group creation is collective), with ``model`` on
    this rank's device (``cuda:LOCAL_RANK`` under a launcher; the groups follow it: NCCL or gloo). ``model``: a
    :class:`~ds_hexamoe.testing.zebra.ZebraModel` (tests) or a Hugging Face model cut by :class:`~.zebra_hf.HFZebraStack`.
    Attention ranks pass their rows of the global batch to :meth:`step`; expert ranks pass nothing.
    Returns this rank's share of the loss (0 on expert ranks); gradients are left in ``model``'s
    parameters, dense ones summed over attention ranks, experts' on their host.
    """

    def __init__(self, model, layout: ZebraLayout, global_batch: int):
        self.model, self.layout = model, layout
        self.rank, world = dist.get_rank(), dist.get_world_size()
        c = model.c
        layout.check(world, c.experts, c.layers)
        if sum(layout.shares) != global_batch:
            raise ValueError(f"zebra.shares: sum {sum(layout.shares)} != global batch {global_batch}; shares must cover the batch")
        self.global_batch = global_batch
        self.device, self.dtype = stack_device(model)  # the rows on the wire have the stack's dtype
        att = list(layout.attention_ranks)
        self.wire = Wire(world, self.device, [(a, h) for a in att for h in layout.hosts if a != h])
        self.dense_group = dist.new_group(att, backend=self.wire.backend) if len(att) > 1 else None
        self.is_attention = self.rank in att
        self.peers = [a for a in att if a != self.rank]  # whose tokens a host serves over the wire
        self.hosts = layout.hosts
        owner = torch.tensor([layout.owners(l) for l in range(c.layers)], dtype=torch.int64)
        slot = torch.zeros_like(owner)
        self.n_hosted = torch.zeros(c.layers, world, dtype=torch.int64)  # a host's sentinel slot per layer
        for l in range(c.layers):
            for r in self.hosts:
                es = (owner[l] == r).nonzero().squeeze(1)
                slot[l, es] = torch.arange(len(es))
                self.n_hosted[l, r] = len(es)
        self.owner, self.slot = owner.to(self.device), slot.to(self.device)
        self.mine = {l: layout.hosted(self.rank, l) for l in range(c.layers)}
        self.is_host = any(self.mine.values())

    def step(self, inputs: torch.Tensor | None = None, target: torch.Tensor | None = None) -> float:
        host = ExpertHost(self.model, self.mine) if self.is_host else None
        if not self.is_attention:
            with expert_region():  # an expert rank runs nothing but expert layers
                self._serve_all(host)
            return 0.0
        share = self.layout.shares[self.layout.attention_ranks.index(self.rank)]
        if inputs is None or inputs.shape[0] != share:
            got = None if inputs is None else list(inputs.shape)
            raise ValueError(f"inputs: rank {self.rank} got {got}; expected its share of samples ({share}) first")
        denom = torch.tensor([self.model.loss_count(target)], dtype=torch.int64, device=self.device)
        if self.dense_group is not None:  # the loss is a mean over the global batch
            dist.all_reduce(denom, group=self.dense_group)
        denom = int(denom)
        xs = torch.tensor_split(inputs, self.layout.micro_batches)
        ts = torch.tensor_split(target, self.layout.micro_batches)
        self._local_grads: dict = {}
        segs = self._forward(xs, ts, denom, host)
        self._backward(segs, host)
        if host is not None:
            host.finish()
        self.wire.finish()
        if self.dense_group is not None:
            self._reduce_dense()
        return float(sum(s[-1].loss.detach() for s in segs))

    def _reduce_dense(self) -> None:
        params = self.model.dense_parameters()
        for p in params:
            if p.grad is None:  # unused on this rank (say an empty share's routers): still in the sum
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dense_group)
        torch.nn.utils.vector_to_parameters(flat, grads)

    # -- attention ranks --------------------------------------------------------------------------------
    def _enter(self, prev: _Seg | None, z0: torch.Tensor) -> tuple[_Seg, torch.Tensor]:
        """A new segment whose input is ``z0`` (layer 0) or ``prev``'s residual plus its received outputs."""
        seg = _Seg()
        if prev is None:
            return seg, z0
        seg.h_in = prev.h_out.detach().requires_grad_(True)
        b, s, d = seg.h_in.shape
        z = seg.h_in.reshape(b * s, d)
        for r, (buf, work) in prev.recv.items():
            if work is not None:
                work.wait()
            seg.y_in[r] = buf.requires_grad_(True)
            z = z + scatter_rows_add(b * s, seg.y_in[r], prev.sent[r][0], buf.dtype)
        return seg, z.view(b, s, d)

    def _post(self, seg: _Seg, layer: int, mb: int, x, idx, w, host: ExpertHost | None) -> None:
        """Send this segment's tokens to the ranks that host their experts (its own: computed here); post the
        receives of their outputs."""
        owner, here = self.owner[layer][idx], None
        for r in self.hosts:
            mine = owner == r
            tok = mine.any(1).nonzero().squeeze(1)
            rows = tok.numel()
            if r != self.rank:
                self.wire.send(torch.tensor([rows], dtype=torch.int64, device=self.device), self.rank, r, "dispatch")
            if not rows:
                continue
            local = torch.where(mine, self.slot[layer][idx], self.n_hosted[layer, r].item()).index_select(0, tok)
            xr = x.index_select(0, tok)
            wr = torch.where(mine, w, w.new_zeros(())).index_select(0, tok)
            seg.sent[r] = (tok, xr, wr)
            if r == self.rank:
                here = (xr, wr, local)
                continue
            self.wire.send(torch.cat((xr.detach(), wr.detach()), 1), self.rank, r, "dispatch")
            self.wire.send(local, self.rank, r, "dispatch")
            buf = self.wire.buffer(("y", layer, mb, r), rows, x.size(1), x.dtype)
            seg.recv[r] = (buf, self.wire.irecv(buf, r, self.rank, "combine"))
        if here is not None:  # after the sends, so the other hosts start meanwhile
            with expert_region():
                seg.recv[self.rank] = (host.forward((layer, mb, self.rank), *here), None)

    def _forward(self, xs, ts, denom, host) -> list[list[_Seg]]:
        c, m = self.model.c, self.layout.micro_batches
        segs: list[list[_Seg]] = [[] for _ in range(m)]
        for layer in range(c.layers + 1):
            for j in range(m):
                seg, z = self._enter(segs[j][-1] if layer else None, None if layer else self.model.embed(xs[j]))
                if layer == c.layers:
                    seg.loss = self.model.head_loss(z, ts[j], denom)
                else:
                    seg.h_out, x, idx, w = self.model.attention_segment(layer, z)
                    self._post(seg, layer, j, x, idx, w, host)
                    if host is not None:  # the peers posted their tokens of (layer, j) before serving ours
                        with expert_region():
                            self._serve(host, layer, j)
                segs[j].append(seg)
        return segs

    def _backward(self, segs: list[list[_Seg]], host) -> None:
        c, m, d = self.model.c, self.layout.micro_batches, self.model.c.d
        for layer in range(c.layers, -1, -1):
            for j in range(m):
                seg = segs[j][layer]
                if layer == c.layers:
                    torch.autograd.backward(seg.loss)
                else:
                    outs, grads = [seg.h_out], [segs[j][layer + 1].h_in.grad]
                    for r, (tok, xr, wr) in seg.sent.items():
                        if r == self.rank:
                            g = self._local_grads.pop((layer, j))
                        else:
                            g = self.wire.recv(self.wire.buffer(("g", layer, j, r), tok.numel(), d + wr.size(1), xr.dtype),
                                               r, self.rank, "combine")
                        outs += [xr, wr]
                        grads += [g[:, :d], g[:, d:]]
                    torch.autograd.backward(outs, grads)
                for r, y in seg.y_in.items():  # gradients of the outputs the hosts sent for layer - 1
                    if r == self.rank:
                        with expert_region():
                            self._local_grads[(layer - 1, j)] = host.backward((layer - 1, j, r), y.grad)
                    else:
                        self.wire.send(y.grad, self.rank, r, "dispatch")
                if host is not None and 0 < layer:
                    with expert_region():
                        self._serve_back(host, layer - 1, j)

    # -- hosts: expert ranks, and attention ranks that host experts -------------------------------------------
    def _serve(self, host: ExpertHost, layer: int, j: int) -> None:
        """Serve the peers' tokens of (layer, micro-batch ``j``), in attention-rank order."""
        wire, d, k = self.wire, self.model.c.d, self.model.c.top_k
        for a in self.peers:
            rows = int(wire.recv(wire.count(("n", layer, j, a)), a, self.rank, "dispatch"))
            if not rows:
                continue
            xw = wire.recv(wire.buffer(("xw", layer, j, a), rows, d + k, self.dtype), a, self.rank, "dispatch")
            idx = wire.recv(wire.buffer(("idx", layer, j, a), rows, k, torch.int64), a, self.rank, "dispatch")
            wire.send(host.forward((layer, j, a), xw[:, :d], xw[:, d:], idx), self.rank, a, "combine")

    def _serve_back(self, host: ExpertHost, layer: int, j: int) -> None:
        """Input gradients of what :meth:`_serve` computed for (layer, ``j``), from the peers' output gradients."""
        for a in self.peers:
            if host.served((layer, j, a)):
                gy = self.wire.recv(self.wire.buffer(("gy", layer, j, a), *host.out_shape((layer, j, a)), self.dtype),
                                    a, self.rank, "dispatch")
                self.wire.send(host.backward((layer, j, a), gy), self.rank, a, "combine")

    def _serve_all(self, host: ExpertHost) -> None:
        """An expert rank's step: every forward message, then every backward one, in the attention ranks' order."""
        c, m = self.model.c, self.layout.micro_batches
        for layer in range(c.layers):
            for j in range(m):
                self._serve(host, layer, j)
        for layer in range(c.layers - 1, -1, -1):
            for j in range(m):
                self._serve_back(host, layer, j)
        host.finish()
        self.wire.finish()

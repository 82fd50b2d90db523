"""Attention/expert disaggregation with the zebra pipeline (HeterMoE; docs/modes.md, "Zebra").

Attention ranks hold the dense part and a batch share; expert-only ranks (batch share 0) hold whole
experts. Each attention rank cuts its share into ``micro_batches`` and walks them layer by layer: after
the attention segment of micro-batch ``j`` it posts that micro-batch's tokens to the expert ranks and
goes straight on to micro-batch ``j+1``, so attention of ``j+1`` runs while the experts process ``j``.
Backward mirrors it: output gradients of ``j`` go out, the backward of ``j+1``'s segment runs meanwhile.

Traffic is point to point with asynchronous ``isend``/``irecv``, on two process groups: ``dispatch``
carries everything from attention to expert ranks (tokens in forward, output gradients in backward),
``combine`` everything back (expert outputs, then input and routing-weight gradients). On gloo each
group has its own connections, so a large combine never queues behind a dispatch. Both sides walk
the same fixed (pass, layer, micro-batch) order, so message tags are computed, not exchanged; only the
row count of each dispatch is sent ahead of its payload.

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
from .weights import ExpertWeights


@dataclass(frozen=True)
class ZebraLayout:
    """Who does what: ``shares[i]`` samples on ``attention_ranks[i]``; expert ``e`` on ``expert_owner[e]``."""

    attention_ranks: tuple[int, ...]
    shares: tuple[int, ...]
    expert_owner: tuple[int, ...]
    micro_batches: int = 2

    def check(self, world: int, num_experts: int) -> None:
        """Raise naming the ``zebra.*`` field and the fix, before any work."""
        att, owners = list(self.attention_ranks), sorted(set(self.expert_owner))
        if not att or len(set(att)) != len(att) or any(not 0 <= r < world for r in att):
            raise ValueError(f"zebra.attention_ranks: got {att}; expected distinct ranks in [0, {world})")
        if len(self.shares) != len(att) or any(not isinstance(s, int) or s < self.micro_batches for s in self.shares):
            raise ValueError(f"zebra.shares: got {list(self.shares)}; expected one integer >= micro_batches "
                             f"({self.micro_batches}) per attention rank")
        if len(self.expert_owner) != num_experts:
            raise ValueError(f"zebra.expert_owner: got {len(self.expert_owner)} entries; expected one rank per expert ({num_experts})")
        expert_ranks = [r for r in range(world) if r not in att]
        if owners != expert_ranks:
            raise ValueError(f"zebra.expert_owner: hosts ranks {owners}; every rank that is not an attention rank "
                             f"({expert_ranks}) must host at least one expert, and attention ranks none")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"zebra.micro_batches: got {self.micro_batches!r}; expected an integer >= 1 (2 or more to overlap)")

    @property
    def expert_ranks(self) -> list[int]:
        return sorted(set(self.expert_owner))

    def hosted(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.expert_owner) if r == rank]

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
    y_in: dict = field(default_factory=dict)  # expert rank -> received output rows (leaves)
    h_out: torch.Tensor | None = None
    sent: dict = field(default_factory=dict)  # expert rank -> (token ids, x rows, w rows) as sent
    recv: dict = field(default_factory=dict)  # expert rank -> (y buffer, work)
    loss: torch.Tensor | None = None


class ZebraPipeline:
    """One rank's side of disaggregated training; call :meth:`step` on every rank in the same order.

    Build it on every rank after ``init_process_group`` (group creation is collective). ``model``: a
    :class:`~ds_hexamoe.testing.zebra.ZebraModel` (tests) or a Hugging Face model cut by :class:`~.zebra_hf.HFZebraStack`.
    Attention ranks pass their rows of the global batch to :meth:`step`; expert ranks pass nothing.
    Returns this rank's share of the loss (0 on expert ranks); gradients are left in ``model``'s
    parameters, dense ones summed over attention ranks.
    """

    def __init__(self, model, layout: ZebraLayout, global_batch: int):
        self.model, self.layout = model, layout
        self.rank, world = dist.get_rank(), dist.get_world_size()
        layout.check(world, model.c.experts)
        if sum(layout.shares) != global_batch:
            raise ValueError(f"zebra.shares: sum {sum(layout.shares)} != global batch {global_batch}; shares must cover the batch")
        self.global_batch = global_batch
        ranks = list(range(world))
        self.dispatch = dist.new_group(ranks, backend="gloo")
        self.combine = dist.new_group(ranks, backend="gloo")
        att = list(layout.attention_ranks)
        self.dense_group = dist.new_group(att, backend="gloo") if len(att) > 1 else None
        self.is_attention = self.rank in att
        self.hosted = {r: layout.hosted(r) for r in layout.expert_ranks}
        # global expert id -> local slot on its owner
        slot = torch.zeros(model.c.experts, dtype=torch.int64)
        for r, es in self.hosted.items():
            slot[es] = torch.arange(len(es))
        self.slot, self.owner = slot, torch.as_tensor(layout.expert_owner)
        self.dtype = model.dense_parameters()[0].dtype  # of the rows on the wire
        self._works: list = []

    # -- tags: both sides enumerate (pass, layer, micro-batch, attention rank, kind) the same way -------
    def _tag(self, bwd: int, layer: int, mb: int, att_rank: int, kind: int) -> int:
        c, m = self.model.c, self.layout.micro_batches
        return ((((bwd * (c.layers + 1) + layer) * m + mb) * 64 + att_rank) * 4) + kind

    def _isend(self, t, dst, group, tag):
        self._works.append(dist.isend(t.contiguous(), dst, group=group, tag=tag))

    def _finish(self) -> None:
        for w in self._works:
            w.wait()
        self._works.clear()

    def step(self, inputs: torch.Tensor | None = None, target: torch.Tensor | None = None) -> float:
        if not self.is_attention:
            with expert_region():  # an expert rank runs nothing but expert layers
                self._serve()
            return 0.0
        share = self.layout.shares[self.layout.attention_ranks.index(self.rank)]
        if inputs is None or inputs.shape[0] != share:
            got = None if inputs is None else list(inputs.shape)
            raise ValueError(f"inputs: rank {self.rank} got {got}; expected its share of samples ({share}) first")
        denom = torch.tensor([self.model.loss_count(target)], dtype=torch.int64)
        if self.dense_group is not None:  # the loss is a mean over the global batch
            dist.all_reduce(denom, group=self.dense_group)
        denom = int(denom)
        xs = torch.tensor_split(inputs, self.layout.micro_batches)
        ts = torch.tensor_split(target, self.layout.micro_batches)
        segs = self._forward(xs, ts, denom)
        self._backward(segs)
        self._finish()
        if self.dense_group is not None:
            params = self.model.dense_parameters()
            for p in params:
                if p.grad is None:  # unused on this rank (say an empty share's routers): still in the sum
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dense_group)
            torch.nn.utils.vector_to_parameters(flat, grads)
        return float(sum(s[-1].loss.detach() for s in segs))

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
            work.wait()
            seg.y_in[r] = buf.requires_grad_(True)
            z = z + scatter_rows_add(b * s, seg.y_in[r], prev.sent[r][0], buf.dtype)
        return seg, z.view(b, s, d)

    def _post(self, seg: _Seg, layer: int, mb: int, x, idx, w) -> None:
        """Send this segment's tokens to the expert ranks that host their experts; post the receives."""
        owner = self.owner[idx]
        for r in self.layout.expert_ranks:
            mine = owner == r
            tok = mine.any(1).nonzero().squeeze(1)
            n = torch.tensor([tok.numel()], dtype=torch.int64)
            self._isend(n, r, self.dispatch, self._tag(0, layer, mb, self.rank, 0))
            local = torch.where(mine, self.slot[idx], len(self.hosted[r])).index_select(0, tok)
            xr = x.index_select(0, tok)
            wr = torch.where(mine, w, w.new_zeros(())).index_select(0, tok)
            seg.sent[r] = (tok, xr, wr)
            if tok.numel():
                self._isend(torch.cat((xr.detach(), wr.detach()), 1), r, self.dispatch, self._tag(0, layer, mb, self.rank, 1))
                self._isend(local, r, self.dispatch, self._tag(0, layer, mb, self.rank, 2))
            buf = x.new_empty(tok.numel(), x.size(1))
            work = dist.irecv(buf, r, group=self.combine, tag=self._tag(0, layer, mb, self.rank, 3)) if tok.numel() else None
            seg.recv[r] = (buf, work if work is not None else _Done())

    def _forward(self, xs, ts, denom) -> list[list[_Seg]]:
        c, m = self.model.c, self.layout.micro_batches
        segs: list[list[_Seg]] = [[] for _ in range(m)]
        for layer in range(c.layers + 1):
            for j in range(m):
                seg, z = self._enter(segs[j][-1] if layer else None, None if layer else self.model.embed(xs[j]))
                if layer == c.layers:
                    seg.loss = self.model.head_loss(z, ts[j], denom)
                else:
                    seg.h_out, x, idx, w = self.model.attention_segment(layer, z)
                    self._post(seg, layer, j, x, idx, w)
                segs[j].append(seg)
        return segs

    def _backward(self, segs: list[list[_Seg]]) -> None:
        c, m = self.model.c, self.layout.micro_batches
        for layer in range(c.layers, -1, -1):
            for j in range(m):
                seg = segs[j][layer]
                if layer == c.layers:
                    torch.autograd.backward(seg.loss)
                else:
                    outs, grads = [seg.h_out], [segs[j][layer + 1].h_in.grad]
                    for r, (tok, xr, wr) in seg.sent.items():
                        if tok.numel():
                            g = xr.new_empty(tok.numel(), xr.size(1) + wr.size(1))
                            dist.irecv(g, r, group=self.combine, tag=self._tag(1, layer, j, self.rank, 1)).wait()
                            outs += [xr, wr]
                            grads += [g[:, : xr.size(1)], g[:, xr.size(1):]]
                    torch.autograd.backward(outs, grads)
                for r, y in seg.y_in.items():  # gradients of the outputs the experts sent for layer - 1
                    self._isend(y.grad, r, self.dispatch, self._tag(1, layer - 1, j, self.rank, 0))

    # -- expert ranks -----------------------------------------------------------------------------------
    def _serve(self) -> None:
        c, m, d = self.model.c, self.layout.micro_batches, self.model.c.d
        hosted = self.hosted[self.rank]
        done: dict = {}
        mats: dict = {}  # layer -> (weights from the parameters, detached leaves every message of the step uses)

        def weights(layer: int) -> ExpertWeights:
            # materialized once per layer and step: one copy and one gradient scatter, not one per message
            if layer not in mats:
                full = self.model.experts_of(layer, hosted)
                mats[layer] = (full, ExpertWeights(full.w1.detach().requires_grad_(True), full.w2.detach().requires_grad_(True)))
            return mats[layer][1]

        for layer in range(c.layers):
            for j in range(m):
                for a in self.layout.attention_ranks:
                    n = torch.zeros(1, dtype=torch.int64)
                    dist.recv(n, a, group=self.dispatch, tag=self._tag(0, layer, j, a, 0))
                    rows = int(n)
                    if not rows:
                        continue
                    xw = torch.empty(rows, d + c.top_k, dtype=self.dtype)
                    idx = torch.empty(rows, c.top_k, dtype=torch.int64)
                    dist.recv(xw, a, group=self.dispatch, tag=self._tag(0, layer, j, a, 1))
                    dist.recv(idx, a, group=self.dispatch, tag=self._tag(0, layer, j, a, 2))
                    x = xw[:, :d].clone().requires_grad_(True)
                    w = xw[:, d:].clone().requires_grad_(True)
                    y = self.model.expert_segment(layer, hosted, x, idx, w, weights(layer))
                    self._isend(y.detach(), a, self.combine, self._tag(0, layer, j, a, 3))
                    done[(layer, j, a)] = (x, w, y)
        for layer in range(c.layers - 1, -1, -1):
            for j in range(m):
                for a in self.layout.attention_ranks:
                    if (layer, j, a) not in done:
                        continue
                    x, w, y = done.pop((layer, j, a))
                    gy = torch.empty_like(y)
                    dist.recv(gy, a, group=self.dispatch, tag=self._tag(1, layer, j, a, 0))
                    torch.autograd.backward(y, gy)
                    self._isend(torch.cat((x.grad, w.grad), 1), a, self.combine, self._tag(1, layer, j, a, 1))
        for full, leaf in mats.values():
            if leaf.w1.grad is not None:
                torch.autograd.backward([full.w1, full.w2], [leaf.w1.grad, leaf.w2.grad])
        self._finish()


class _Done:
    """Stand-in for the receive of an empty payload."""

    def wait(self):
        return True

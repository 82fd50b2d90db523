"""Expert-parallel and model-centric execution of FSSDP-managed MoE layers inside training
(docs/design.md, "Execution modes").

The FSSDP-installed experts forward of a layer in ``expert_parallel`` or ``model_centric`` mode runs
:class:`~ds_hexamoe.parallel.ParallelMoE` with weights materialized from the FSSDP shards:

- **expert parallel**: the layer's placement ``{expert: [ranks]}`` (default: every expert on its FSSDP
  owner) says which ranks host which experts. Hosting is an FSSDP transfer whose "active mask" is the
  placement itself (known on every rank, so no mask exchange): an owner hosting its own expert copies
  it locally into the one-layer cache (no bytes on the wire), a replica is gathered sparsely from the
  owner (SparseAllGather), and the backward's SparseReduceScatter sums replica gradients into the
  owner's gradient buffer, which the sharded optimizer steps as usual. The cache slot, the
  re-materialization in backward and the prefetch are the data-centric ones. Weights are handed over
  as full-layer views (``full_layer = True``), so no hosted expert is copied out of the cache.
- **model centric**: every rank needs the ``f``-slice ``[lo_r, hi_r)`` of every expert (slices sized by
  per-rank speeds). Storage stays whole-expert; one all-to-all per layer re-slices it: each owner
  sends rank ``r`` slice ``r`` of each expert it owns (``1/W`` of a layer in, ``1/W`` out per rank), and
  backward returns each rank's slice gradients to the owners the same way (disjoint slices: a
  scatter, no sum). The slices (one shard's worth of bytes per layer) are kept for backward rather
  than re-gathered.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..distributed import world_and_rank
from ..experts.lora import active_lora
from ..experts.protocol import closed_form
from ..parallel.accounting import CommStats, blocked
from ..parallel.weights import ExpertSpec, ExpertWeights
from .collectives import Transfer, plan_transfer
from .layer import ExpertLayer


# ------------------------------------------------------------------------------------------ layer spec
def check_parallel_module(name: str, m) -> str:
    """The activation name of an experts module the parallel modes can run; a ConfigError otherwise."""
    act, why = closed_form(m)
    if why is not None:
        raise ConfigError(f'hexamoe.mode: experts module {name!r} cannot run "expert_parallel"/"model_centric" '
                          f'({why}); use "mode": "data_centric" for this model')
    return act


def expert_spec(layer: ExpertLayer) -> ExpertSpec:
    """The :class:`ExpertSpec` of an FSSDP layer, or a ConfigError naming what the parallel modes cannot run."""
    m = layer.module
    act = check_parallel_module(layer.name, m)
    down = layer.expert_shapes[layer.names["w2"]]  # [d, f] stored, [f, d] transposed
    ffn = down[0] if getattr(m, "is_transposed", False) else down[1]
    return ExpertSpec(num_experts=layer.num_experts, ffn_dim=int(ffn), act=act, gated=bool(getattr(m, "has_gate", True)),
                      interleaved=not getattr(m, "is_concatenated", True))


def to_compute(layer: ExpertLayer, full: dict[str, torch.Tensor], b2_default: torch.Tensor | None = None) -> ExpertWeights:
    """Stored-orientation tensors ``{param name: [n, ...]}`` as :class:`ExpertWeights` (``w1 [n, d, F1]``)."""
    names, m = layer.names, layer.module
    w1, w2 = full[names["w1"]], full[names["w2"]]
    if not getattr(m, "is_transposed", False):
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    b1 = full.get(names["b1"]) if "b1" in names else None
    b2 = (full.get(names["b2"]) if "b2" in names else None)
    if "b2" in names and b2_default is not None:
        b2 = b2_default
    lora = active_lora(m, dict({k: full[n] for k, n in names.items() if n in full}, w1=w1))
    return ExpertWeights(w1, w2, b1, b2, lora=lora or None)


# ------------------------------------------------------------------------------------ expert parallel
def default_placement(layer: ExpertLayer) -> dict[int, list[int]]:
    """Every expert on its FSSDP owner: hosting moves no weights."""
    return {e: [layer.ownership.owner(e)] for e in range(layer.num_experts)}


def placement_transfer(layer: ExpertLayer, key: tuple[tuple[int, ...], ...], rank: int) -> Transfer:
    """The FSSDP transfer that hosts ``key``'s experts: rank ``q`` "uses" the experts placed on it."""
    world = layer.ownership.world_size
    masks = [[q in key[e] for e in range(layer.num_experts)] for q in range(world)]
    return plan_transfer(layer.ownership, masks, rank)


class PlacedMaterializer:
    """``Materialize`` for an expert-parallel call: the hosted experts, as full-layer cache views. With
    ``ahead`` (the "hecate" mode) they were gathered asynchronously before the layer's attention, into the
    cache slot or buffer ``ahead`` holds, and are only waited for here, right before dispatch."""

    full_layer = True

    def __init__(self, materializer, layer: ExpertLayer, transfer: Transfer, ahead=None, gathers=None):
        self.materializer, self.layer, self.transfer = materializer, layer, transfer
        self.ahead, self.gathers = ahead, gathers

    def __call__(self, experts: Sequence[int], f_range=None) -> ExpertWeights:
        if f_range is not None:
            raise ValueError("PlacedMaterializer: expert-parallel hosting materializes whole experts (f_range=None)")
        ahead, layer, mat = self.ahead, self.layer, self.materializer
        # copies that moved are kept for backward, never re-gathered there: whether a rank's backward needs a
        # re-gather, and when against its gradient reduces, follows autograd's order, which differs between
        # ranks whose dispatch differs (a re-gather on one rank met another's collective: measured, 4 ranks)
        keep = self.transfer.moves
        if ahead is None:
            full = mat.materialize(layer, self.transfer, keep=keep)
        else:
            full = mat.materialize(layer, self.transfer, fill=lambda _: self.gathers.finish_ahead(layer, ahead),
                                   dest=ahead.dest, slot=layer.index, keep=keep)
        return to_compute(layer, full)


# ------------------------------------------------------------------------------------- model centric
class SlicePlan:
    """Which part of each stored expert tensor rank ``q`` computes with, for hidden slices ``f_sizes``."""

    def __init__(self, layer: ExpertLayer, spec: ExpertSpec, f_sizes: Sequence[int]):
        self.layer, self.f_sizes = layer, list(f_sizes)
        transposed = getattr(layer.module, "is_transposed", False)
        names = layer.names
        self.bias_rank = next(r for r, n in enumerate(self.f_sizes) if n > 0)
        world = len(self.f_sizes)
        starts = [sum(self.f_sizes[:r]) for r in range(world + 1)]
        # axis of the hidden dimension in a [n, ...] stored tensor
        self.axis = {names["w1"]: 2 if transposed else 1, names["w2"]: 1 if transposed else 2}
        if "b1" in names:
            self.axis[names["b1"]] = 1
        if "b2" in names:
            self.axis[names["b2"]] = 1
        # LoRA factors A[E, in, r], B[E, r, out]: B1 and A2 follow the hidden slice; A1 and B2 go whole to every
        # rank (their gradients then sum over ranks: backward adds slices with index_add)
        lora = [k for k in ("w1_lora_a", "w1_lora_b", "w2_lora_a", "w2_lora_b") if k in names]
        self.axis.update({names[k]: (1 if k.endswith("_a") else 2) for k in lora})
        self.index: list[dict[str, torch.Tensor]] = []
        for q in range(world):
            lo, hi = starts[q], starts[q + 1]
            cols = spec.f1_columns(lo, hi)
            idx = {names["w1"]: cols, names["w2"]: torch.arange(lo, hi)}
            if "b1" in names:
                idx[names["b1"]] = cols
            if "b2" in names:  # the output bias lives on one rank
                d = layer.expert_shapes[names["b2"]][0]
                idx[names["b2"]] = torch.arange(d) if q == self.bias_rank else torch.arange(0)
            for k in lora:
                whole = torch.arange(layer.expert_shapes[names[k]][self.axis[names[k]] - 1])
                idx[names[k]] = {"w1_lora_b": cols, "w2_lora_a": torch.arange(lo, hi)}.get(k, whole)
            self.index.append(idx)
        self.names = layer.param_names
        self.shapes = [{n: self._shape(n, q) for n in self.names} for q in range(world)]
        self.width = [sum(_numel(s) for s in self.shapes[q].values()) for q in range(world)]

    def _shape(self, name: str, q: int) -> tuple[int, ...]:
        shape = list(self.layer.expert_shapes[name])
        shape[self.axis[name] - 1] = self.index[q][name].numel()
        return tuple(shape)

    def pack(self, tensors: dict[str, torch.Tensor], q: int, dtype: torch.dtype) -> torch.Tensor:
        """Slice ``q`` of ``{name: [n, ...]}`` packed as ``[n, width[q]]``."""
        n = next(iter(tensors.values())).size(0)
        cols = []
        for name in self.names:
            t = tensors[name]
            idx = self.index[q][name].to(t.device)
            cols.append(t.index_select(self.axis[name], idx).reshape(n, -1).to(dtype))
        return torch.cat(cols, 1) if cols else torch.empty(n, 0, dtype=dtype)

    def unpack(self, rows: torch.Tensor, q: int) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for name in self.names:
            shape = self.shapes[q][name]
            k = _numel(shape)
            out[name] = rows[:, off:off + k].reshape(rows.size(0), *shape)
            off += k
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _ids(experts, device) -> torch.Tensor:
    return torch.tensor(list(experts), dtype=torch.long, device=device)


def _a2a(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group, stats) -> torch.Tensor:
    recv = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
    with blocked(stats, "slices"):
        dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=group)
    return recv


class MaterializeSlices(torch.autograd.Function):
    """Forward: every expert's ``f``-slice for this rank, re-sliced from whole-expert shards by one
    all-to-all. Backward: each slice gradient back to its expert's owner (into FSSDP's gradient buffers).
    ``store``: the :class:`~.shard_store.ShardStore`; ``telemetry``: the step's counters."""

    @staticmethod
    def forward(ctx, store, telemetry, layer: ExpertLayer, sp: SlicePlan, *shards):
        ctx.set_materialize_grads(False)
        ctx.store, ctx.telemetry, ctx.layer, ctx.sp = store, telemetry, layer, sp
        rank, world, group, stats = store.rank, store.world_size, store.group, telemetry.stats
        own, n_own = layer.ownership, layer.local_count
        local = {n: s.detach() for n, s in zip(layer.param_names, shards)}
        dtype, device = layer.dtype, layer.device
        esize = torch.empty(0, dtype=dtype).element_size()
        parts, send_counts = [], []
        for q in range(world):
            if q == rank or n_own == 0 or sp.width[q] == 0:
                send_counts.append(0)
                continue
            parts.append(sp.pack(local, q, dtype).reshape(-1))
            send_counts.append(n_own * sp.width[q])
            for e in own.owned(rank):
                stats.expert_bytes[(layer.index, e)] += sp.width[q] * esize
            stats.experts_sent += n_own
        recv_counts = [own.count(o) * sp.width[rank] if o != rank else 0 for o in range(world)]
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        recv = _a2a(send, send_counts, recv_counts, group, stats)
        stats.collectives += 1
        stats.gather_bytes += send.numel() * esize
        stats.recv_bytes += recv.numel() * esize
        out = {n: torch.empty((layer.num_experts, *sp.shapes[rank][n]), dtype=dtype, device=device) for n in sp.names}
        if n_own:
            mine = sp.unpack(sp.pack(local, rank, dtype), rank)
            ids = _ids(own.owned(rank), device)
            for n in sp.names:
                out[n].index_copy_(0, ids, mine[n])
        off = 0
        for o in range(world):
            c = recv_counts[o]
            if c == 0:
                continue
            rows = recv[off:off + c].view(own.count(o), sp.width[rank])
            ids = _ids(own.owned(o), device)
            for n, t in sp.unpack(rows, rank).items():
                out[n].index_copy_(0, ids, t)
            off += c
        ctx.mark_non_differentiable(*(out[n] for n in sp.names if not layer.shards[n].requires_grad))
        return tuple(out[n] for n in sp.names)

    @staticmethod
    def backward(ctx, *grads):
        store, layer, sp = ctx.store, ctx.layer, ctx.sp
        rank, world, group, stats = store.rank, store.world_size, store.group, ctx.telemetry.stats
        own, n_own = layer.ownership, layer.local_count
        ref = next((g for g in grads if g is not None), None)
        wire = ref.dtype if ref is not None else layer.dtype
        device = layer.device
        g = {}
        for n, gr in zip(sp.names, grads):
            g[n] = gr if gr is not None else torch.zeros((layer.num_experts, *sp.shapes[rank][n]), dtype=wire, device=device)
        esize = torch.empty(0, dtype=wire).element_size()
        parts, send_counts = [], []
        # the gradients are already this rank's slices: flatten, do not slice again
        packed = torch.cat([g[n].reshape(layer.num_experts, -1).to(wire) for n in sp.names], 1) if sp.width[rank] else None
        for o in range(world):
            c = own.count(o)
            if o == rank or c == 0 or sp.width[rank] == 0:
                send_counts.append(0)
                continue
            parts.append(packed.index_select(0, _ids(own.owned(o), device)).reshape(-1))
            send_counts.append(c * sp.width[rank])
            for e in own.owned(o):
                stats.expert_bytes[(layer.index, e)] += sp.width[rank] * esize
        recv_counts = [n_own * sp.width[q] if q != rank else 0 for q in range(world)]
        send = torch.cat(parts) if parts else torch.empty(0, dtype=wire, device=device)
        recv = _a2a(send, send_counts, recv_counts, group, stats)
        stats.collectives += 1
        stats.reduce_bytes += send.numel() * esize
        stats.recv_bytes += recv.numel() * esize
        if n_own:
            acc = {n: torch.zeros((n_own, *layer.expert_shapes[n]), dtype=torch.float32, device=device) for n in sp.names}

            def add(rows: dict[str, torch.Tensor], q: int) -> None:
                for n, t in rows.items():
                    acc[n].index_add_(sp.axis[n], sp.index[q][n].to(device), t.to(torch.float32))

            mine = _ids(own.owned(rank), device)
            add({n: g[n].index_select(0, mine) for n in sp.names}, rank)
            off = 0
            for q in range(world):  # rank order: a fixed order on every run
                c = recv_counts[q]
                if c == 0:
                    continue
                add(sp.unpack(recv[off:off + c].view(n_own, sp.width[q]), q), q)
                off += c
            scale = 1.0 / world  # DeepSpeed averages dense gradients over data-parallel ranks
            for n in layer.grad_names:  # a frozen shard has no gradient buffer
                store.grads[(layer.index, n)].add_(acc[n], alpha=scale)
        return (None, None, None, None) + (None,) * len(sp.names)


class SliceMaterializer:
    """``Materialize`` for a model-centric call: this rank's ``f``-slice of every expert."""

    def __init__(self, store, telemetry, layer: ExpertLayer, plan: SlicePlan):
        self.store, self.telemetry, self.layer, self.plan = store, telemetry, layer, plan

    def __call__(self, experts: Sequence[int], f_range=None) -> ExpertWeights:
        layer, sp = self.layer, self.plan
        shards = [layer.shards[n] for n in layer.param_names]
        outs = MaterializeSlices.apply(self.store, self.telemetry, layer, sp, *shards)
        full = dict(zip(layer.param_names, outs))
        b2 = None
        if "b2" in layer.names and self.store.rank != sp.bias_rank:  # unused on this rank: shape only
            b2 = torch.zeros((layer.num_experts, *layer.expert_shapes[layer.names["b2"]]), dtype=layer.dtype,
                             device=layer.device)
        return to_compute(layer, full, b2)


# ------------------------------------------------------------------------------------------- checks
def agree(what: str, value, group, stats: CommStats) -> None:
    """Raise on every rank of ``group`` unless every rank passed the same ``value`` (one tiny all_gather)."""
    import hashlib

    world, rank = world_and_rank(group)
    digest = int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 1
    mine = torch.tensor([digest], dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(world)]
    with blocked(stats, "agree"):
        dist.all_gather(out, mine, group=group)
    stats.mask_bytes += 8 * (world - 1)
    got = [int(t) for t in out]
    if len(set(got)) != 1:
        bad = [r for r, d in enumerate(got) if d != got[rank]]
        raise ValueError(f"{what}: ranks {bad} passed a different value than rank {rank}; call it on every rank "
                         "with the same arguments")


def normalize_placement(placement: Mapping, layer: ExpertLayer, world: int) -> dict[int, list[int] | dict[int, float]]:
    """``{expert: [ranks]}`` (or ``{expert: {rank: token fraction}}`` entries) with JSON string keys
    accepted; validated (raises naming the entry)."""
    from ..parallel.replicas import placement_weights, validate_placement

    def num(r):
        return int(r) if isinstance(r, str) and r.isdigit() else r

    if not isinstance(placement, Mapping):
        raise ValueError(f"placement for {layer.name!r}: got {type(placement).__name__}; expected a dict "
                         "{expert: [ranks]} (or None for every expert on its FSSDP owner)")
    p = {}
    for k, v in placement.items():
        if isinstance(k, str) and k.lstrip("-").isdigit():
            k = int(k)
        if isinstance(v, Mapping):
            p[k] = {num(r): f for r, f in v.items()}
        else:
            p[k] = [num(r) for r in v] if isinstance(v, (list, tuple)) else v
    try:
        key = validate_placement(p, layer.num_experts, world)
        weights = placement_weights(p, key)
    except ValueError as e:
        raise ValueError(f"placement for {layer.name!r}: {e}") from None
    return {e: (list(r) if weights is None or weights[e] is None else dict(zip(r, weights[e])))
            for e, r in enumerate(key)}


__all__ = ["PlacedMaterializer", "SliceMaterializer", "MaterializeSlices", "SlicePlan",
           "check_parallel_module", "default_placement", "expert_spec", "placement_transfer", "agree",
           "normalize_placement"]

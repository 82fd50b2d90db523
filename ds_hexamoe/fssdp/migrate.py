"""Re-sharding a live FSSDP model to new shard weights: parameters, fp32 masters and optimizer state.

The in-memory counterpart of :mod:`.checkpoint`'s N->M re-sharding: there each rank reads, from the
files of the old layout, the experts it owns now; here each old owner sends them straight to the new
owners, one ``all_to_all_single`` per (layer, parameter) with variable splits (each block holds the
experts going from one owner to one new owner in increasing id order, on both sides, so any ownership,
contiguous or not, is served: shard weights or load-aware re-ownership). What moves per expert is the record a checkpoint stores: the fp32 master (the
parameter itself for fp32 models) and every per-expert optimizer state tensor (Adam's moments);
scalar state (Adam's ``step``) is the same on every owner and copied.

Call at an optimizer-step boundary (gradients zero), on every rank of the FSSDP group. DeepSpeed's
dense state is untouched.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .ownership import LayerOwnership, normalized_weights, split_experts
from .schedule import ranks_per_node


def _moving(a: LayerOwnership, r: int, b: LayerOwnership, q: int) -> list[int]:
    """Experts rank ``r`` owns under ``a`` and rank ``q`` under ``b``, in increasing id order."""
    return [e for e in a.owned(r) if b.owner(e) == q]


def plan_ownership(mgr, weights) -> list[LayerOwnership]:
    """The ownership for shard ``weights``: each rank's number of experts from its weight, which experts by
    load (Hecate's load-aware ownership) where a layer has a load window, contiguous ranges otherwise, so a
    heterogeneity re-plan does not undo load-aware re-ownership."""
    w = normalized_weights(list(weights), mgr.world_size)
    counts = [split_experts(layer.num_experts, w, layer=layer.index) for layer in mgr.layers]
    return mgr.gathers.load_aware_ownerships(ranks_per_node(mgr.world_size), fallback=counts)


def migrate_shards(mgr, weights) -> dict:
    """Move ``mgr``'s expert shards to the ownership ``weights`` gives (:func:`plan_ownership`; see the
    module docstring).

    Returns ``{"moved_experts": n, "bytes_sent": b, "counts": {layer: [experts per rank]}}`` (``moved_experts``
    counts experts changing owner over all layers, the same on every rank; ``bytes_sent`` is this rank's)."""
    return migrate_to(mgr, plan_ownership(mgr, weights))


def migrate_to(mgr, new_owns: list[LayerOwnership]) -> dict:
    """Move ``mgr``'s expert shards (with masters and optimizer state) to ``new_owns`` (one per layer)."""
    mgr.synchronize()
    counts = {layer.name: [o.count(r) for r in range(mgr.world_size)] for layer, o in zip(mgr.layers, new_owns)}
    moved = sum(sum(1 for e in range(layer.num_experts) if layer.ownership.owner(e) != o.owner(e))
                for layer, o in zip(mgr.layers, new_owns))
    if moved == 0:
        return {"moved_experts": 0, "bytes_sent": 0, "counts": counts}
    for g in mgr.grads.values():
        if g.numel() and bool(g.ne(0).any()):
            raise RuntimeError("migrate_shards: expert gradients are pending; migrate between optimizer steps "
                               "(after engine.step() at an accumulation boundary)")
    opt = mgr.optimizer
    entries = {e.key: e for e in opt.entries} if opt is not None else {}
    layouts = _state_layouts(mgr, opt, entries)
    new_rows, sent = _exchange_rows(mgr, new_owns, opt, entries, layouts)
    spec = opt.spec if opt is not None else None
    mgr.rebuild_shards(new_owns, new_rows)
    if spec is not None:
        _restore_optimizer(mgr, mgr.build_optimizer(spec), new_rows, layouts)
    return {"moved_experts": moved, "bytes_sent": sent, "counts": counts}


def _state_layouts(mgr, opt, entries) -> dict[tuple[int, str], tuple[list[str], dict]]:
    """Per (layer, parameter): the names of its per-expert optimizer state and its scalar state, agreed
    over ranks (a rank owning no expert of a layer has no state for it)."""
    local = {}
    for layer in mgr.layers:
        for n in layer.param_names:
            e = entries.get((layer.index, n))
            st = opt.state(e) if e is not None else {}
            per = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.dim() >= 1 and v.size(0) == layer.local_count)
            scal = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items() if k not in per}
            local[(layer.index, n)] = (per, scal) if layer.local_count > 0 else (None, None)
    every = [None] * mgr.world_size
    dist.all_gather_object(every, local, group=mgr.group)
    return {key: next(((p, s) for p, s in (d[key] for d in every) if p is not None), ([], {})) for key in local}


def _exchange_rows(mgr, new_owns, opt, entries, layouts) -> tuple[dict[tuple[int, str], torch.Tensor], int]:
    """Each new owner's rows (fp32 master, then every per-expert state), sent by the old owners; and the
    bytes this rank sent to others."""
    rank, world = mgr.rank, mgr.world_size
    sent = 0
    new_rows: dict[tuple[int, str], torch.Tensor] = {}
    for layer, new in zip(mgr.layers, new_owns):
        old = layer.ownership
        sends = [_moving(old, rank, new, q) for q in range(world)]
        recv_splits = [len(_moving(old, o, new, rank)) for o in range(world)]
        send_splits = [len(s) for s in sends]
        order = layer.local_rows([e for s in sends for e in s])
        for n in layer.param_names:
            key = (layer.index, n)
            per, _ = layouts[key]
            p = layer.shards[n]
            e = entries.get(key)
            master = e.master if e is not None else p
            st = opt.state(e) if e is not None else {}
            k = layer.expert_numel(n)
            dtype = master.dtype if master.dtype in (torch.float32, torch.float64) else torch.float32
            cols = [master.detach().reshape(layer.local_count, k).to(dtype)]
            for s in per:
                v = st.get(s)
                cols.append(v.detach().reshape(layer.local_count, k).to(dtype) if v is not None
                            else torch.zeros(layer.local_count, k, dtype=dtype, device=p.device))
            send = torch.cat(cols, dim=1).index_select(0, order.to(p.device)).contiguous()
            recv = torch.empty(new.count(rank), send.size(1), dtype=dtype, device=p.device)
            dev = torch.device("cpu") if dist.get_backend(mgr.group) == "gloo" else p.device
            r_cpu = recv.to(dev)
            dist.all_to_all_single(r_cpu, send.to(dev), output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                   group=mgr.group)
            # received grouped by old owner; shard rows go in increasing expert id
            got = [e for o in range(world) for e in _moving(old, o, new, rank)]
            rows = r_cpu.to(p.device)
            new_rows[key] = rows.index_select(0, torch.tensor([got.index(e) for e in new.owned(rank)], dtype=torch.long,
                                                             device=p.device)) if got else rows
            sent += sum(send_splits[q] for q in range(world) if q != rank) * send.size(1) * send.element_size()
    return new_rows, sent


def _restore_optimizer(mgr, new_opt, new_rows, layouts) -> None:
    """fp32 masters and optimizer state of the rebuilt optimizer from the rows received."""
    for e in new_opt.entries:
        layer = mgr.layers[e.key[0]]
        rows = new_rows[e.key]
        k = layer.expert_numel(e.key[1])
        c = layer.local_count
        shape = (c, *layer.expert_shapes[e.key[1]])
        if e.master is not e.param:
            with torch.no_grad():
                e.master.copy_(rows[:, :k].reshape(shape))
        per, scal = layouts[e.key]
        if e in new_opt.stepped and (per or scal):
            state = {s: rows[:, k * (i + 1):k * (i + 2)].reshape(shape).to(e.master.dtype).clone()
                     for i, s in enumerate(per)}
            for s, v in scal.items():
                state[s] = v.clone().to(e.master.device) if torch.is_tensor(v) else v
            new_opt.set_state(e, state)

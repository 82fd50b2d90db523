"""FSSDP checkpoints beside DeepSpeed's, re-sharded by expert id on load, and full-expert export.

Layout inside DeepSpeed's ``<save_dir>/<tag>/``: ``fssdp_rank{r:05d}.pt`` per rank (its shards, fp32
masters and optimizer state, keyed by layer name, rows in the order of the global expert ids listed)
and ``fssdp_index.json`` (world size and every rank's expert ids per layer; format 1 stored contiguous
ranges, still read). Each file is written to a temporary name and renamed, so a crash never leaves a
half-written file under the final name. Loading on the same world size adopts the saved ownership
(which load-aware re-ownership may have made non-contiguous); on another world size each rank keeps
its current experts. Either way a rank reads only the files holding experts it owns.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os

import torch
import torch.distributed as dist

from ..atomic import atomic_write, atomic_write_with
from ..distributed import failures_everywhere
from .lora import fill_peft_keys

FORMAT = 2
INDEX = "fssdp_index.json"


def _rank_file(r: int) -> str:
    return f"fssdp_rank{r:05d}.pt"


def _atomic_save(obj, path: str) -> None:
    if isinstance(obj, (dict, list)) and path.endswith(".json"):
        atomic_write(path, json.dumps(obj, indent=1))
    else:
        atomic_write_with(path, lambda fh: torch.save(obj, fh))


def save_shards(mgr, directory: str) -> None:
    """Write this rank's shards and optimizer state under ``directory`` (a collective: ends in a barrier)."""
    mgr.synchronize()
    os.makedirs(directory, exist_ok=True)
    layers = {}
    opt = mgr.optimizer
    entries = {e.key: e for e in opt.entries} if opt is not None else {}
    for layer in mgr.layers:
        rec = {"index": layer.index, "num_experts": layer.num_experts,
               "expert_ids": list(layer.owned), "params": {}, "optim": {}}
        for n, p in layer.shards.items():
            e = entries.get((layer.index, n))
            rec["params"][n] = (e.master if e is not None else p).detach().clone()
            if e is not None:
                rec["optim"][n] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in opt.state(e).items()}
        layers[layer.name] = rec
    payload = {"format": FORMAT, "world_size": mgr.world_size, "rank": mgr.rank, "layers": layers,
               "optimizer": opt.spec.__dict__ if opt is not None else None}
    _atomic_save(payload, os.path.join(directory, _rank_file(mgr.rank)))
    if mgr.rank == 0:
        index = {"format": FORMAT, "world_size": mgr.world_size,
                 "layers": {layer.name: [list(ids) for ids in layer.ownership.experts] for layer in mgr.layers}}
        _atomic_save(index, os.path.join(directory, INDEX))
    dist.barrier(group=mgr.group)


def load_shards(mgr, directory: str, load_optimizer_states: bool = True) -> None:
    """Fill this rank's shards (and optimizer state) from a checkpoint saved with any number of ranks.

    Every rank first reads the files it needs, then all ranks exchange the outcome: a file one rank cannot
    read (missing, damaged, a pickle ``weights_only`` refuses) raises on every rank within seconds, naming
    the rank, the file and the reason, before anything is changed."""
    mgr.synchronize()
    err, read = None, None
    try:
        read = _read_shards(mgr, directory)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    failed = failures_everywhere(err, group=mgr.group)
    if failed:
        raise RuntimeError(f"loading the FSSDP experts of checkpoint {directory!r} failed on "
                           + "; ".join(f"rank {r} ({e})" for r, e in failed) + "; every rank stopped, nothing was loaded")
    saved, same_world, files = read
    if same_world:
        _adopt(mgr, saved)
    opt = mgr.optimizer
    entries = {e.key: e for e in opt.entries} if opt is not None else {}
    states: dict[tuple[int, str], dict] = {}
    for r, data in sorted(files.items()):
        for layer in mgr.layers:
            if r not in _sources(layer, saved, mgr.rank, same_world):
                continue
            _fill_layer(layer, data["layers"][layer.name], entries, states, load_optimizer_states)
    if opt is not None and load_optimizer_states:
        for key, st in states.items():
            opt.set_state(entries[key], st)
    mgr.zero_grad()
    dist.barrier(group=mgr.group)


def _sources(layer, saved: dict, rank: int, same_world: bool) -> list[int]:
    """The saved ranks whose files hold experts this rank owns after the load."""
    mine = set(saved[layer.index].owned(rank) if same_world else layer.owned)
    return [r for r, ids in enumerate(saved[layer.index].experts) if mine.intersection(ids)]


def _read_shards(mgr, directory: str) -> tuple[dict, bool, dict[int, dict]]:
    """``(saved ownership, same world size, {saved rank: its file's contents})`` for the files this rank
    needs; no collective, so a failure here can be reported to every rank."""
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"FSSDP checkpoint index {path!r} is missing: the checkpoint was not saved by an "
                                "engine with FSSDP attached (or is incomplete)")
    with open(path) as fh:
        index = json.load(fh)
    saved = _saved_ownership(mgr, index, directory)
    same_world = index["world_size"] == mgr.world_size
    need = sorted({r for layer in mgr.layers for r in _sources(layer, saved, mgr.rank, same_world)})
    files = {}
    for r in need:
        f = os.path.join(directory, _rank_file(r))
        try:
            files[r] = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, OSError
            raise RuntimeError(f"cannot load {f!r}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        held = files[r].get("layers") if isinstance(files[r], dict) else None
        lacking = [layer.name for layer in mgr.layers if r in _sources(layer, saved, mgr.rank, same_world)
                   and not (isinstance(held, dict) and layer.name in held)]
        if lacking:
            raise KeyError(f"{f!r} holds no experts of {lacking} (the index says it does)")
    return saved, same_world, files


def _fill_layer(layer, rec: dict, entries: dict, states: dict, load_optimizer_states: bool) -> None:
    """Copy the rows of one saved file's layer record that this rank owns into its shards (and state)."""
    f_ids = rec["expert_ids"] if "expert_ids" in rec else list(range(*rec["experts"]))
    both = [e for e in f_ids if e in set(layer.owned)]
    dst = layer.local_rows(both).cpu()
    src = torch.tensor([f_ids.index(e) for e in both], dtype=torch.long)
    for n, p in layer.shards.items():
        e = entries.get((layer.index, n))
        with torch.no_grad():
            p.index_copy_(0, dst.to(p.device), rec["params"][n][src].to(p.device, p.dtype))
            if e is not None and e.master is not p:
                e.master.index_copy_(0, dst.to(p.device), rec["params"][n][src].to(p.device, e.master.dtype))
        if e is None or not load_optimizer_states or n not in rec["optim"]:
            continue
        st = states.setdefault((layer.index, n), {})
        for k, v in rec["optim"][n].items():
            if torch.is_tensor(v) and v.dim() >= 1 and v.size(0) == len(f_ids):  # per-expert state
                if k not in st:
                    st[k] = torch.zeros((layer.local_count, *v.shape[1:]), dtype=v.dtype)
                st[k].index_copy_(0, dst, v[src])
            elif k not in st:
                st[k] = v.clone() if torch.is_tensor(v) else v


def _saved_ownership(mgr, index: dict, directory: str) -> dict:
    """``{layer index: LayerOwnership}`` of the checkpoint (format 1: contiguous ``starts``)."""
    from .ownership import LayerOwnership

    out = {}
    for layer in mgr.layers:
        if layer.name not in index["layers"]:
            raise KeyError(f"FSSDP checkpoint {directory!r} has no experts module {layer.name!r}")
        entry = index["layers"][layer.name]
        if index.get("format", 1) == 1:
            own = LayerOwnership.from_starts(entry[-1], entry)
        else:
            own = LayerOwnership(sum(len(ids) for ids in entry), tuple(tuple(ids) for ids in entry))
        if own.num_experts != layer.num_experts:
            raise ValueError(f"FSSDP checkpoint: {layer.name!r} has {own.num_experts} experts, the model "
                             f"{layer.num_experts}")
        out[layer.index] = own
    return out


def _adopt(mgr, saved: dict) -> None:
    """Same world size: take the saved ownership (shards rebuilt empty, then filled from the files)."""
    if all(layer.ownership == saved[layer.index] for layer in mgr.layers):
        return
    owns = [saved[layer.index] for layer in mgr.layers]
    rows = {(layer.index, n): torch.zeros(own.count(mgr.rank), layer.expert_numel(n), device=layer.device)
            for layer, own in zip(mgr.layers, owns) for n in layer.param_names}
    spec = mgr.optimizer.spec if mgr.optimizer is not None else None
    mgr.rebuild_shards(owns, rows)
    if spec is not None:
        mgr.build_optimizer(spec)


def _tag_dir(engine, root: str, tag) -> str | None:
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.exists(latest):
            return None
        with open(latest) as fh:
            tag = fh.read().strip()
    return os.path.join(root, str(tag))


@contextlib.contextmanager
def _frozen_shards_marked_trainable(mgr):
    """DeepSpeed saves the parameters its optimizer does not own ("frozen") from rank 0's model and copies them
    into every rank's on load; frozen expert shards (LoRA's base) differ per rank, so they pass as trainable while
    DeepSpeed saves or loads (FSSDP's own files carry them)."""
    frozen = [p for p in mgr.store.shard_parameters() if not p.requires_grad and p.numel()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def wrap_checkpointing(mgr, engine) -> None:
    inner_save, inner_load = engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(inner_save)
    def save_checkpoint(save_dir, tag=None, *args, **kwargs):
        mgr.synchronize()
        tag = f"global_step{engine.global_steps}" if tag is None else tag  # DeepSpeed's default tag
        with _frozen_shards_marked_trainable(mgr):
            out = inner_save(save_dir, tag, *args, **kwargs)
        save_shards(mgr, os.path.join(save_dir, str(tag)))
        return out

    @functools.wraps(inner_load)
    def load_checkpoint(load_dir, tag=None, *args, expert_optimizer_states: bool | None = None, **kwargs):
        """DeepSpeed's ``load_checkpoint`` plus the FSSDP shards. ``expert_optimizer_states`` (default: follow
        ``load_optimizer_states``) restores the experts' optimizer state even where DeepSpeed cannot re-partition
        the dense one (a different world size needs ``load_optimizer_states=False`` on DeepSpeed's side)."""
        mgr.synchronize()
        with _frozen_shards_marked_trainable(mgr):
            out = inner_load(load_dir, tag, *args, **kwargs)
        load_path = out[0] if isinstance(out, tuple) else out
        if load_path is None:
            return out
        directory = _tag_dir(engine, load_dir, tag)
        if expert_optimizer_states is None:
            expert_optimizer_states = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        load_shards(mgr, directory, load_optimizer_states=expert_optimizer_states)
        return out

    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def full_state_dict(mgr, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Dense state dict plus full ``[E, ...]`` experts, assembled on rank 0 (or everywhere); experts' LoRA
    factors under PEFT's keys and layout (:func:`~.lora.fill_peft_keys`)."""
    mgr.synchronize()
    group, world = mgr.group, mgr.world_size
    out = {k: v.detach().clone() for k, v in mgr.model.state_dict().items()} if (mgr.rank == 0 or not rank0_only) else {}
    for layer in mgr.layers:
        adapters = {}
        counts = [layer.ownership.count(r) for r in range(world)]
        ids = torch.tensor([e for r in range(world) for e in layer.ownership.owned(r)], dtype=torch.long)
        cap = max(counts)
        for n, p in layer.shards.items():
            shape = layer.expert_shapes[n]
            send = torch.zeros((cap, *shape), dtype=p.dtype, device=p.device)
            send[: p.size(0)].copy_(p.detach())
            bufs = [torch.empty_like(send) for _ in range(world)]
            dist.all_gather(bufs, send, group=group)
            if mgr.rank == 0 or not rank0_only:
                rows = torch.cat([b[:c] for b, c in zip(bufs, counts)], dim=0)
                full = torch.empty_like(rows).index_copy_(0, ids.to(rows.device), rows)
                prefix = f"{layer.name}." if layer.name else ""
                if n in layer.adapter_names:  # LoRA factors go under PEFT's own keys, in its layout
                    adapters[n] = full
                else:
                    out[prefix + n] = full
        if adapters:
            fill_peft_keys(mgr, layer, adapters, out)
    return out

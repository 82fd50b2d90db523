"""Checkpoints that resume exactly and are checked before use: DeepSpeed's files, per-rank RNG states
(tensors and plain values, loaded with ``weights_only=True``), a manifest of checksums, then an atomic
``latest`` (docs/design.md, "Recipes, tasks, worker and CLI" and "Checkpoints you can trust")."""
from __future__ import annotations

import dataclasses
import errno
import io
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ...config import ConfigError
from ...distributed import dist_on, failures_everywhere
from ...recipes import Recipe
from ...atomic import atomic_write
from ...distributed import seed_all
from ...tasks.base import WorkerContext
from .manifest import (MANIFEST, CheckpointCorrupt, check_files, checkpoint_files, corrupt_message, file_digest,
                       read_manifest, write_manifest)

STATE_KEY = "hexamoe_train"
RANK_STATE_FORMAT = 2  # 1: a pickled dict (numpy arrays, tuples), which needed weights_only=False
_PREFIX = "global_step"


def rng_state() -> dict:
    """Every RNG stream as tensors and plain values only, so the file loads with ``weights_only=True``."""
    version, mt, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    np.random.set_state((npy["key"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def _rank_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"hexamoe_rank{rank:05d}.pt")


def save_rank_state(path: str, step: int, loop: dict) -> None:
    """This rank's step, loop state and RNG streams (tensors and plain values: no pickled objects)."""
    atomic_torch_save({"format": RANK_STATE_FORMAT, "step": step, "loop": dict(loop), "rng": rng_state()}, path)


def load_rank_state(path: str) -> dict:
    """A file of :func:`save_rank_state`, read with ``weights_only=True``: a file holding anything but tensors
    and plain values is refused, so a crafted file cannot run code here."""
    if not os.path.isfile(path):
        raise CheckpointCorrupt(f"--resume: this rank's state file {path!r} is missing; the checkpoint is "
                                "incomplete (pass --resume-fallback to resume from an older one that verifies)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise CheckpointCorrupt(f"--resume: refusing to load {path!r}: it is not a ds-hexamoe rank state file of "
                                f"tensors and plain values ({why})") from None
    if not isinstance(data, dict) or data.get("format") != RANK_STATE_FORMAT or "rng" not in data:
        raise CheckpointCorrupt(f"--resume: {path!r} is not a ds-hexamoe rank state file of format "
                                f"{RANK_STATE_FORMAT} (written by another version?)")
    return data


def _steps_of(ckpt_dir: str) -> list[tuple[int, str]]:
    """``(step, folder name)`` of every ``global_step<N>`` folder, complete or not."""
    return [(int(name[len(_PREFIX):]), name) for name in os.listdir(ckpt_dir)
            if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit()]


def read_latest(ckpt_dir: str) -> str | None:
    """The tag of the last complete checkpoint, or None."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as fh:
            tag = fh.read().strip()
    except OSError:
        return None
    return tag or None


def save_checkpoint(engine, ckpt_dir: str, step: int, state: dict, ctx: WorkerContext, keep: int,
                    adapters_only: bool = False) -> str:
    """Save DeepSpeed's checkpoint ``global_step{step}``, this rank's state file, the manifest of checksums,
    then publish ``latest``. ``adapters_only`` (LoRA): the module file holds the trainable parameters only (the
    frozen base is the recipe's ``model.path``); the optimizer state covers only them anyway.

    ``latest`` is written (atomically, by rank 0) only after every rank has finished writing and the
    manifest is on disk, so a save interrupted at any point leaves the previous checkpoint as the one a
    resume uses. A failed save (disk full) says which disk and which checkpoint is intact.
    """
    tag = f"{_PREFIX}{step}"
    tag_dir = os.path.join(ckpt_dir, tag)
    _refuse_published(tag_dir, ctx)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={STATE_KEY: state}, save_latest=False,
                               exclude_frozen_parameters=adapters_only)
        save_rank_state(_rank_state_path(ckpt_dir, tag, ctx.rank), step, state)
        ctx.barrier()
        digests = _spread(ctx, checkpoint_files(tag_dir) if ctx.is_main else None,
                          lambda names: {n: file_digest(os.path.join(tag_dir, n), sync=True) for n in names})
        if ctx.is_main:
            write_manifest(tag_dir, digests, {"tag": tag, "step": step, "world_size": ctx.world_size})
    except Exception as e:
        raise RuntimeError(save_failed_message(ckpt_dir, tag, e)) from e
    ctx.barrier()
    if ctx.is_main:
        atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        if keep > 0:
            _prune_checkpoints(ckpt_dir, keep, tag)
    ctx.barrier()
    return tag


def _refuse_published(tag_dir: str, ctx: WorkerContext) -> None:
    """A published checkpoint (its manifest is on disk) is never written over; rank 0's view decides, so
    every rank raises or none does. A folder without a manifest is a save that never completed."""
    box = [os.path.exists(os.path.join(tag_dir, MANIFEST))]
    if dist_on() and ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RuntimeError(f"saving checkpoint {os.path.basename(tag_dir)!r}: {tag_dir!r} already holds a published "
                           "checkpoint (of an earlier run), which is never written over; nothing was saved. Move it "
                           "out of the way, or resume that run with --resume")


def _spread(ctx: WorkerContext, names: list[str] | None, work) -> dict:
    """Rank 0's list of file names, split over the ranks; ``work(my_names)`` dicts merged on every rank."""
    if not dist_on() or ctx.world_size == 1:
        return work(names)
    box = [names]
    dist.broadcast_object_list(box, src=0)
    mine = work(box[0][ctx.rank :: ctx.world_size])
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def save_failed_message(ckpt_dir: str, tag: str, err: BaseException) -> str:
    """What failed, the disk it was written to (mount point, free space), and which checkpoint is intact."""
    latest = read_latest(ckpt_dir)
    intact = (f"the last intact checkpoint is {os.path.join(ckpt_dir, latest)!r} ('latest' still names it; "
              "resume from it with --resume)" if latest else "no checkpoint of this run is complete yet")
    text = f"{type(err).__name__}: {err}"
    return (f"saving checkpoint {tag!r} into {ckpt_dir!r} failed ({text[:300]}). {disk_of(ckpt_dir, err)}; "
            f"{intact}. Free space there or set training.output_dir on another disk")


def disk_of(path: str, err: BaseException) -> str:
    """Whether ``err`` says the disk is full, where the disk holding ``path`` is mounted and its free space."""
    full = any(getattr(e, "errno", None) == errno.ENOSPC for e in _chain(err)) or "No space left" in str(err)
    mount = os.path.abspath(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    try:
        usage = shutil.disk_usage(mount)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        space = "free space unknown"
    return f"{'The disk is full: ' if full else ''}the disk holding it is mounted at {mount!r} ({space})"


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _prune_checkpoints(ckpt_dir: str, keep: int, current: str) -> None:
    cur = int(current[len(_PREFIX):])
    # only completed, older checkpoints; an unpublished newer folder is a crashed save and is overwritten later
    done = sorted(t for t in _steps_of(ckpt_dir) if t[0] <= cur)
    for _, name in done[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def remove_unpublished(ckpt_dir: str, step: int) -> None:
    """Delete checkpoint folders newer than the resumed one: saves that never completed."""
    for num, name in _steps_of(ckpt_dir):
        if num > step:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def verify_everywhere(tag_dir: str, ctx: WorkerContext) -> dict:
    """The manifest of ``tag_dir``, after every rank checked its share of the files against it (the same
    verdict on every rank); :class:`CheckpointCorrupt` naming each bad file."""
    try:
        manifest = read_manifest(tag_dir)
    except CheckpointCorrupt as e:
        raise CheckpointCorrupt(corrupt_message(tag_dir, [str(e)])) from None
    problems = _spread(ctx, sorted(manifest["files"]) if ctx.is_main else None,
                       lambda names: {n: bad for n in names if (bad := check_files(tag_dir, manifest, [n]))})
    if problems:
        raise CheckpointCorrupt(corrupt_message(tag_dir, [p for n in sorted(problems) for p in problems[n]]))
    return manifest


def load_checkpoint(engine, ckpt_dir: str, ctx: WorkerContext, adapters_only: bool = False) -> dict:
    """Load the ``latest`` checkpoint into ``engine`` and this rank's RNG; returns the loop's saved state.
    ``adapters_only``: a checkpoint of :func:`save_checkpoint` with it, loaded over the freshly built base
    (the loop state's ``"peft"`` was compared first, so a checkpoint of another kind never gets here).

    Every file is checked against the manifest first. Each phase ends with the ranks agreeing that all
    of them succeeded, so the call returns on no rank unless every rank loaded: only then may the caller
    change files (trim metrics, remove unpublished saves).
    """
    tag, manifest, rank_state = _agreed(lambda: _prepare_load(ckpt_dir, ctx), ckpt_dir)
    state = _agreed(lambda: _load_engine(engine, ckpt_dir, tag, manifest, rank_state, adapters_only), ckpt_dir)
    if rank_state["rng"] is not None:
        set_rng_state(rank_state["rng"])
    else:  # resumed on another rank count: fresh per-rank streams, a function of seed, step and rank
        seed_all(int(state.get("seed", 0)) + 7919 * int(state["step"]) + ctx.rank)
    return state


def dist_world() -> int:
    return dist.get_world_size() if dist_on() else 1


def _agreed(fn, ckpt_dir: str):
    """``fn()`` on every rank; raises on every rank (this rank's own error where it has one, else the failed
    ranks' errors) unless all ranks succeeded."""
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the ranks agreed that nobody goes on
        err = e
    failed = failures_everywhere(None if err is None else str(err)[:600])
    if err is not None:
        raise err
    if failed:
        raise RuntimeError(f"--resume: another rank failed to load the checkpoint in {ckpt_dir!r} ("
                           + "; ".join(f"rank {r}: {e}" for r, e in failed) + "); nothing was truncated or deleted")
    return out


def _prepare_load(ckpt_dir: str, ctx: WorkerContext) -> tuple[str, dict, dict]:
    """The tag of ``latest``, its verified manifest and this rank's state file, before DeepSpeed reads anything."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir!r} (no 'latest' file); run without --resume")
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ConfigError(f"--resume: {os.path.join(ckpt_dir, 'latest')!r} names {tag!r} but {tag_dir!r} does not "
                          "exist; point 'latest' at an existing checkpoint folder or pass --resume-fallback")
    manifest = verify_everywhere(tag_dir, ctx)
    saved_world = int(manifest.get("world_size", ctx.world_size))
    for r in range(saved_world):  # a missing rank file is an error even where this rank does not read it
        if not os.path.isfile(_rank_state_path(ckpt_dir, tag, r)):
            raise CheckpointCorrupt(f"--resume: {_rank_state_path(ckpt_dir, tag, r)!r} is missing: checkpoint {tag!r} "
                                    f"of {saved_world} ranks is incomplete (pass --resume-fallback to resume from an "
                                    "older one that verifies)")
    # on another rank count this rank's RNG streams are seeded afresh (see _load_engine); the file is still read
    rank_state = load_rank_state(_rank_state_path(ckpt_dir, tag, ctx.rank % saved_world))
    return tag, manifest, rank_state


def _load_engine(engine, ckpt_dir: str, tag: str, manifest: dict, rank_state: dict, adapters_only: bool) -> dict:
    saved_world = int(manifest.get("world_size", 0)) or None
    strict = {"load_module_strict": False} if adapters_only else {}  # the file holds no frozen weights
    if saved_world is not None and saved_world != dist_world():
        from .reshard import load_on_new_world

        path, client = load_on_new_world(engine, ckpt_dir, tag, saved_world, **strict)
        rank_state["rng"] = None  # per-rank streams have no owner on a new rank count; the loop seeds them
    else:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, **strict)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}")
    state = (client or {}).get(STATE_KEY)
    if state is None:
        raise RuntimeError(f"--resume: checkpoint {tag!r} in {ckpt_dir!r} was not written by ds-hexamoe train")
    if not int(rank_state["step"]) == int(state["step"]) == int(manifest.get("step", state["step"])):
        raise CheckpointCorrupt(f"--resume: {os.path.join(ckpt_dir, tag)!r} mixes steps (rank state "
                                f"{rank_state['step']}, DeepSpeed {state['step']}, manifest {manifest.get('step')})")
    return state


def loop_state(recipe: Recipe, step: int, world: int, train_blocks: int, schedule_steps: int | None = None) -> dict:
    """What a checkpoint records of the loop, so a resume can refuse a different data order and keep the
    learning-rate schedule (``schedule_steps``: the steps it spans, by default ``training.steps``)."""
    t = recipe.training
    return {"step": step, "micro_batches": step * t.grad_accum, "world_size": world, "seed": t.seed,
            "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum, "train_blocks": train_blocks,
            "schedule_steps": schedule_steps or t.steps, "peft": peft_key(recipe)}


def peft_key(recipe: Recipe) -> dict | None:
    """What a checkpoint's trainable parameters depend on: the ``"peft"`` section less its export choice."""
    if recipe.peft is None:
        return None
    return {k: v for k, v in dataclasses.asdict(recipe.peft).items() if k != "export_merged"}


def check_resume_compatible(state: dict, recipe: Recipe, world: int, train_blocks: int | None) -> None:
    """Refuse a resume whose data order would differ. Another rank count keeps the order when the global
    micro-batch (``micro_batch_size x ranks``) and ``grad_accum`` stay the same: every step then reads the
    same samples, only split differently over the ranks."""
    t = recipe.training
    want = {"seed": t.seed, "grad_accum": t.grad_accum, "train_blocks": train_blocks}
    for key, value in want.items():
        if key in state and value is not None and state[key] != value:
            raise ConfigError(f"--resume: the checkpoint was written with {key}={state[key]!r} but this run has "
                              f"{value!r}; the data order would differ. Use the same setting or start a new output_dir")
    if state.get("peft") != peft_key(recipe):
        raise ConfigError(f"peft: the checkpoint was written with peft={state.get('peft')!r} but this run has "
                          f"{peft_key(recipe)!r}; its trainable parameters would not match (a LoRA checkpoint holds "
                          "only the adapters). Use the same \"peft\" section or start a new output_dir")
    saved_world, saved_mbs = state.get("world_size", world), state.get("micro_batch_size", t.micro_batch_size)
    if saved_world * saved_mbs != world * t.micro_batch_size:
        g = saved_world * saved_mbs
        fix = (f"set training.micro_batch_size={g // world} (--set training.micro_batch_size={g // world})"
               if g % world == 0 else f"use a rank count that divides {g}")
        raise ConfigError(f"training.micro_batch_size: the checkpoint was written by {saved_world} ranks x "
                          f"micro_batch_size {saved_mbs} = {g} samples per micro-step, this run has {world} x "
                          f"{t.micro_batch_size} = {world * t.micro_batch_size}; the data order would differ. To "
                          f"resume on {world} ranks, {fix}")
    if state["step"] > t.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {state['step']}, past training.steps={t.steps}")

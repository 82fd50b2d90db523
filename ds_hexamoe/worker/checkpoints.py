"""Checkpoints that resume exactly: DeepSpeed's files, per-rank RNG states, then an atomic ``latest``
(docs/design.md, "Recipes, tasks, worker and CLI")."""
from __future__ import annotations

import io
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..recipes import Recipe
from ..tasks.base import WorkerContext, atomic_write

STATE_KEY = "hexamoe_train"
_PREFIX = "global_step"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def _rank_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"hexamoe_rank{rank:05d}.pt")


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


def save_checkpoint(engine, ckpt_dir: str, step: int, state: dict, ctx: WorkerContext, keep: int) -> str:
    """Save DeepSpeed's checkpoint ``global_step{step}`` and this rank's RNG, then publish ``latest``.

    ``latest`` is written (atomically, by rank 0) only after every rank has finished writing, so a
    save interrupted at any point leaves the previous checkpoint as the one a resume uses.
    """
    tag = f"{_PREFIX}{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={STATE_KEY: state}, save_latest=False)
    atomic_torch_save({"step": step, "rng": rng_state()}, _rank_state_path(ckpt_dir, tag, ctx.rank))
    ctx.barrier()
    if ctx.is_main:
        atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        if keep > 0:
            _prune_checkpoints(ckpt_dir, keep, tag)
    ctx.barrier()
    return tag


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


def load_checkpoint(engine, ckpt_dir: str, ctx: WorkerContext) -> dict:
    """Load the ``latest`` checkpoint into ``engine`` and this rank's RNG; returns the loop's saved state."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir!r} (no 'latest' file); run without --resume")
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}")
    state = (client or {}).get(STATE_KEY)
    if state is None:
        raise RuntimeError(f"--resume: checkpoint {tag!r} in {ckpt_dir!r} was not written by ds-hexamoe train")
    rank_file = _rank_state_path(ckpt_dir, tag, ctx.rank)
    if os.path.exists(rank_file):
        set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return state


def loop_state(recipe: Recipe, step: int, world: int, train_blocks: int) -> dict:
    """What a checkpoint records of the loop, so a resume can refuse a different data order."""
    t = recipe.training
    return {"step": step, "micro_batches": step * t.grad_accum, "world_size": world, "seed": t.seed,
            "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum, "train_blocks": train_blocks}


def check_resume_compatible(state: dict, recipe: Recipe, world: int, train_blocks: int) -> None:
    t = recipe.training
    want = {"world_size": world, "seed": t.seed, "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
            "train_blocks": train_blocks}
    for key, value in want.items():
        if key in state and state[key] != value:
            raise ConfigError(f"--resume: the checkpoint was written with {key}={state[key]!r} but this run has "
                              f"{value!r}; the data order would differ. Use the same setting or start a new output_dir")
    if state["step"] > t.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {state['step']}, past training.steps={t.steps}")

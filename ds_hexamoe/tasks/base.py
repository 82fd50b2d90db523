"""What every task shares: the process context a task builder receives, the parts it returns, the lookup
of a recipe's task, seeding, and atomic writes of files the ranks share (docs/design.md, "Recipes, tasks,
worker and CLI").

A task is ``fn(recipe, ctx: WorkerContext) -> TaskParts``, named in :data:`ds_hexamoe.recipes.TASKS` or
given as ``"package.module:function"`` in the recipe's ``"task"`` key.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError
from ..distributed import dist_on
from ..recipes import TASKS, Recipe


@dataclass
class WorkerContext:
    """What a task builder needs to know about the process it runs in."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    output_dir: str = "."
    resume: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist_on():
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (filling caches, writing shared files), then the other ranks."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


@dataclass
class TaskParts:
    """A task's pieces. ``collate`` builds the keyword arguments of ``model(**batch)``, whose output
    has a ``.loss``; ``count`` says how many units (tokens, images) a batch holds for throughput;
    ``processor`` (a tokenizer, an image processor) is saved with the Hugging Face export."""

    model: torch.nn.Module
    train: Any
    validation: Any | None
    collate: Callable[[list], dict]
    processor: Any = None
    unit: str = "tok"
    count: Callable[[dict], int] = field(default=lambda b: int(b["input_ids"].numel()))


def task_builder(recipe: Recipe):
    """The function building the recipe's task (``TASKS`` name or ``"package.module:function"``)."""
    if recipe.task not in TASKS and not getattr(recipe, "trust_task_import", False):
        raise ConfigError(f"task: {recipe.task!r} is not a registered task {sorted(TASKS)}; set "
                          '"trust_task_import": true in the recipe to import and call it')
    target = TASKS.get(recipe.task, recipe.task)
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task: cannot import {target!r} ({e}); allowed values are {sorted(TASKS)} or an "
                          "importable 'package.module:function'") from None
    return fn


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- atomic writes: a reader (another rank, a resumed run) sees the old file or the new one, never half


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to a temp file next to ``path``, fsync it, then rename it onto ``path``."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save_dir(write, final: str) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` onto ``final`` (an old ``final`` is replaced whole)."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        write(tmp)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

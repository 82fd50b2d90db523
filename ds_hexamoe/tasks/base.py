"""What every task shares: the process context a task builder receives, the parts it returns, and the lookup
of a recipe's task (docs/design.md, "Recipes, tasks, worker and CLI").

A task is ``fn(recipe, ctx: WorkerContext) -> TaskParts``, named in :data:`ds_hexamoe.recipes.TASKS` or
given as ``"package.module:function"`` in the recipe's ``"task"`` key.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class EvalMetric:
    """A validation metric beside the loss: ``score(batch, output) -> (sum, count)`` of one batch. The worker
    adds both up over the whole validation split and every rank and reports ``sum / count`` as
    ``val_<name>`` in ``metrics.jsonl`` and ``summary.json``."""

    name: str
    score: Callable[[dict, Any], tuple[Any, Any]]


@dataclass
class TaskParts:
    """A task's pieces. ``collate`` builds the keyword arguments of ``model(**batch)``, whose output
    has a ``.loss``; ``count`` says how many units (tokens, images) a batch holds for throughput;
    ``processor`` (a tokenizer, an image processor) is saved with the Hugging Face export;
    ``eval_metric``, when given, is evaluated with the validation loss; ``whole_model``, when ``model`` was
    built on the meta device (a zebra rank builds only its part), builds the whole model (the colocated step's)."""

    model: torch.nn.Module
    train: Any
    validation: Any | None
    collate: Callable[[list], dict]
    processor: Any = None
    unit: str = "tok"
    count: Callable[[dict], int] = field(default=lambda b: int(b["input_ids"].numel()))
    eval_metric: EvalMetric | None = None
    whole_model: Callable[[], torch.nn.Module] | None = None


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

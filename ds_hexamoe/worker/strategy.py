"""What differs between the ways one optimizer step runs; the loop (:mod:`.loop`) owns the rest (docs/design.md,
"Recipes, tasks, worker and CLI").

Two strategies implement :class:`StepStrategy`: :class:`~.colocated.ColocatedStep` (a DeepSpeed engine, every
rank holds attention and experts) and :class:`~.zebra.ZebraStep` (the zebra pipeline: attention and expert
ranks apart). The loop reads the data order, counts optimizer steps, reports the learning rate, writes
metrics rows, evaluates, saves checkpoints where the strategy keeps them, exports and summarizes.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class StepResult:
    """One optimizer step over all ranks: the loss and auxiliary loss (NaN: none) as reported, and the
    units (tokens, images) the step trained on."""

    loss: float
    aux_loss: float
    units: float


class StepStrategy(Protocol):
    """One rank's side of an optimizer step. Built by :func:`.loop.run` after the task."""

    name: str  # "colocated" or "zebra": progress bar, metrics rows
    module: torch.nn.Module  # the Hugging Face model: evaluation, export
    device: Any
    keeps_checkpoints: bool  # False: save_every and --resume are refused before any work

    def data_shares(self) -> tuple[Any, int | None]:
        """``(shares, index)``: how global micro-batches are cut and which share this rank reads (``shares``
        None: even; ``index`` None: this rank reads no data)."""

    def lr(self) -> float | None:
        """The learning rate the next step applies."""

    def step(self, batches: Iterator[dict] | None, step: int) -> StepResult:
        """``grad_accum`` micro-batches from ``batches``, forward, backward and the optimizer; ``step`` counts
        this one (1-based). Collective."""

    def row_metrics(self) -> tuple[float | None, dict, dict]:
        """Expert-load balance, the runtime's metrics and extra keys of this metrics row."""

    def forward(self, batch: dict):
        """The model's output on ``batch`` (evaluation; the loop sets eval mode)."""

    def set_training(self, on: bool) -> None: ...

    def eval_module(self) -> torch.nn.Module:
        """The whole model, between ``set_training(False)`` and ``set_training(True)``: what transformers'
        ``generate`` runs on."""

    def save(self, step: int, state: dict) -> None: ...

    def load(self) -> dict: ...

    def export_state(self) -> dict | None:
        """The full state dict on rank 0 (None: the module's own). Collective."""

    def header_lines(self) -> list[str]: ...

    def summary_fields(self) -> dict: ...

    def report(self, metrics_path: str, train_s: float, steps: int, hf_dir: str | None) -> dict | None:
        """The end-of-run report (rank 0)."""

    def close(self) -> None: ...

"""The recipe's ``"logging"`` section (TensorBoard and Weights & Biases writers of the metrics rows) and
``training.generate`` (greedy samples at evaluation steps), checked before launch (docs/recipes.md,
"Logging" and "Generation at evaluation")."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, _check

EXTRA = "ds-hexamoe[logging]"


@dataclass
class LoggingSpec:
    """``tensorboard``: event files under ``output_dir/tensorboard``; ``wandb``: a Weights & Biases run (``mode``
    "offline" needs no network; null: wandb's own default, ``WANDB_MODE`` included). Rank 0 writes."""

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ds-hexamoe"
    wandb_mode: Literal["online", "offline"] | None = None

    def validate(self, path: str) -> None:
        for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if getattr(self, key) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"{path}.{key}: true, but the {module!r} package is not installed; install the "
                                  f"extra with pip install '{EXTRA}' (or {module} alone), or set {path}.{key} false")
        _check(bool(self.wandb_project), f"{path}.wandb_project", self.wandb_project, "a non-empty project name")


@dataclass
class GenerateSpec:
    """Greedy continuations of ``prompts`` (plain text, tokenized as given) at every evaluation step."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 16

    def validate(self, path: str) -> None:
        _check(len(self.prompts) > 0 and all(isinstance(p, str) and p for p in self.prompts), f"{path}.prompts",
               self.prompts, "a non-empty list of non-empty strings")
        _check(self.max_new_tokens >= 1, f"{path}.max_new_tokens", self.max_new_tokens, "an integer >= 1")


def check_generate(r) -> None:
    """``training.generate`` runs at evaluation steps of a causal-LM task only."""
    g = r.training.generate
    if g is None:
        return
    if r.task != "causal-lm":
        raise ConfigError(f"training.generate: the task {r.task!r} is not a causal language model; remove "
                          "training.generate (it samples text from causal-lm models)")
    if not r.training.eval_every:
        raise ConfigError("training.generate: it runs at evaluation steps, and training.eval_every is 0 (off); set "
                          "training.eval_every > 0, or remove training.generate")

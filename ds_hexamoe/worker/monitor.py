"""TensorBoard and Weights & Biases writers of the worker's metrics rows (the recipe's ``"logging"`` section;
docs/recipes.md, "Logging"). Rank 0 writes; the other ranks hold no writer.

Tags: ``train/<key>`` for a row's numbers (``loss``, ``aux_loss``, ``lr``, ``balance``, ...), ``eval/<key>`` for the
validation figures, ``train/z_loss`` and, per MoE layer, ``router/<layer>/<figure>`` (``imbalance``, ``entropy``,
``aux_loss``, ``z_loss``) and ``router/<layer>/tokens/e<i>``; generations as text (``eval/generations``).
"""
from __future__ import annotations

import os

TB_DIR = "tensorboard"


def scalar_tags(rec: dict) -> dict[str, float]:
    """A metrics row's numbers under their TensorBoard / W&B tags."""
    out: dict[str, float] = {}
    for key, value in rec.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"eval/{key}" if key.startswith("val_") else f"train/{key}"] = float(value)
    router = rec.get("router") or {}
    if router.get("z_loss") is not None:
        out["train/z_loss"] = float(router["z_loss"])
    for layer, figs in (router.get("layers") or {}).items():
        for name, value in figs.items():
            if name == "tokens":
                out.update({f"router/{layer}/tokens/e{e}": float(v) for e, v in enumerate(value)})
            elif value is not None:
                out[f"router/{layer}/{name}"] = float(value)
    return out


def generations_text(rec: dict) -> str | None:
    """The row's generations as Markdown lines (None without any)."""
    gens = rec.get("generations")
    if not gens:
        return None
    return "\n\n".join(f"**{g['prompt']!r}** -> {g['completion']!r}" for g in gens)


class RunMonitor:
    """The writers ``recipe.logging`` asks for, on rank 0 (``is_main``); :meth:`log` takes metrics rows."""

    def __init__(self, recipe, is_main: bool):
        spec, out = recipe.logging, recipe.training.output_dir
        self.tb = self.wandb = None
        if not is_main:
            return
        if spec.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, TB_DIR))
        if spec.wandb:
            import wandb

            self.wandb = wandb.init(project=spec.wandb_project, name=recipe.name, dir=out, mode=spec.wandb_mode,
                                    config=recipe.to_dict())

    def log(self, rec: dict) -> None:
        step, scalars, text = rec["step"], scalar_tags(rec), generations_text(rec)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            if text is not None:
                self.tb.add_text("eval/generations", text, step)
            self.tb.flush()
        if self.wandb is not None:
            extra = {"eval/generations": text} if text is not None else {}
            self.wandb.log({**scalars, **extra}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

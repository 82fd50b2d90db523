"""What a recipe hands the engine: the DeepSpeed config (batch geometry, precision, optimizer and the
``"hexamoe"`` section filled in from the recipe) and the learning-rate schedule.

These functions read a :class:`~ds_hexamoe.recipes.schema.Recipe` by attribute only, so the schema can
offer them as methods without an import cycle (docs/design.md, "Recipes, tasks, worker and CLI").
"""
from __future__ import annotations

import copy
import math
import os

from ..config import ConfigError, HexaMoEConfig
from ..jsonfile import read_json


def load_ds_dict(r) -> dict:
    """A copy of the recipe's DeepSpeed section: the inline dict, or the JSON file it names."""
    if isinstance(r.deepspeed, dict):
        return copy.deepcopy(r.deepspeed)
    data = read_json(r.deepspeed, "deepspeed", "give an existing DeepSpeed JSON file")
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {r.deepspeed!r} holds a {type(data).__name__}; expected a JSON object")
    return data


def check_ds_config(r) -> None:
    """Keys the recipe sets must not be set differently in its DeepSpeed config."""
    ds = load_ds_dict(r) if (isinstance(r.deepspeed, dict) or os.path.isfile(r.deepspeed)) else None
    if ds is None:
        return
    t = r.training
    want = {"train_micro_batch_size_per_gpu": (t.micro_batch_size, "training.micro_batch_size"),
            "gradient_accumulation_steps": (t.grad_accum, "training.grad_accum")}
    for key, (value, owner) in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"deepspeed.{key}: {ds[key]!r} conflicts with {owner} = {value!r}; remove it from "
                              "the DeepSpeed config (the recipe sets it)")
    clip = ds.get("gradient_clipping")
    if clip is not None and t.max_grad_norm > 0 and clip != t.max_grad_norm:
        raise ConfigError(f"deepspeed.gradient_clipping: {clip!r} conflicts with training.max_grad_norm = "
                          f"{t.max_grad_norm!r}; remove one of them")
    for name in ("bf16", "fp16"):
        sec = ds.get(name)
        if isinstance(sec, dict) and sec.get("enabled", False) and t.dtype != name:
            raise ConfigError(f"deepspeed.{name}.enabled: true conflicts with training.dtype = {t.dtype!r}; set "
                              f'training.dtype to "{name}" or disable it in the DeepSpeed config')
    if "hexamoe" in ds and r.hexamoe is not None and ds["hexamoe"] != r.hexamoe:
        raise ConfigError('hexamoe: the recipe and its DeepSpeed config both set a "hexamoe" section and they '
                          "differ; keep one (the recipe's top-level \"hexamoe\" is preferred)")
    hx = r.hexamoe_config
    if "hexamoe" in ds and r.hexamoe is None and not isinstance(r.deepspeed, dict):
        hx = HexaMoEConfig.from_dict(ds["hexamoe"], "deepspeed.hexamoe")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed.zero_optimization: got {zero!r}; expected a JSON object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: got {stage!r}; expected 0, 1, 2 or 3 (DeepSpeed's "
                          "ZeRO stages)")
    if stage == 3 and hx is not None and hx.enabled and hx.sharding == "fssdp":
        # ZeRO-3 partitions every parameter and gathers it in hooks that FSSDP's own expert exchanges do not match
        raise ConfigError('deepspeed.zero_optimization.stage: got 3 with hexamoe.sharding "fssdp"; FSSDP already '
                          "shards the experts and ZeRO-3's parameter gathers collide with its exchanges: use stage "
                          '0, 1 or 2 (the dense part\'s optimizer state is still sharded at 1 and 2), or set '
                          'hexamoe.sharding to "none"')


def build_ds_config(r, world_size: int | None = None, accelerator: str | None = None) -> dict:
    """The run's DeepSpeed config (see :meth:`~ds_hexamoe.recipes.schema.Recipe.ds_config`).

    The learning-rate schedule is not put here: the worker passes :func:`lr_lambda` as a client
    scheduler (DeepSpeed's own warmup schedulers run the first step at lr 0) unless the DeepSpeed
    config names a ``"scheduler"`` of its own."""
    ds = load_ds_dict(r)
    t = r.training
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    if world_size is not None:
        ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    else:
        ds.pop("train_batch_size", None)
    if t.dtype in ("bf16", "fp16"):
        ds.setdefault(t.dtype, {})["enabled"] = True
    # always set: DeepSpeed's own default clips at 1.0, so training.max_grad_norm 0 ("no clipping") needs a 0 here
    ds.setdefault("gradient_clipping", t.max_grad_norm)
    if "optimizer" not in ds:
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}}
        if accelerator == "cpu":
            # DeepSpeed's FusedAdam needs a compiled op on CPU; torch's AdamW is the same update
            ds["optimizer"]["params"]["torch_adam"] = True
    section = r.hexamoe if r.hexamoe is not None else ds.get("hexamoe")
    if section is not None:
        ds["hexamoe"] = copy.deepcopy(section)
    ds.setdefault("steps_per_print", max(t.steps + 1, 10**9))  # the worker logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def lr_lambda(t):
    """Learning-rate multiplier of the ``s``-th optimizer step (0-based) of a ``TrainingSpec``: linear
    warmup reaching 1 at step ``warmup_steps - 1``, then cosine or linear decay to ``min_lr_ratio`` at
    the last step."""

    def fn(s: int) -> float:
        if s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        span = max(1, t.steps - t.warmup_steps - 1)
        progress = min(1.0, (s - t.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1.0 - progress
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return fn

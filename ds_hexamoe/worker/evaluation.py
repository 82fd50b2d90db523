"""Validation during training: the loss and the task's metric (:class:`~ds_hexamoe.tasks.base.EvalMetric`,
e.g. top-1 accuracy) over the whole validation split, sharded over ranks and reduced."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import dist_on
from ..tasks.base import TaskParts, WorkerContext


def evaluate(strategy, parts: TaskParts, ctx: WorkerContext, micro_batch_size: int) -> dict[str, float | None]:
    """``{"val_loss": ..., "val_<metric>": ...}``: the loss weighted by units (tokens, images), the metric as
    the sum of its parts over the count of its parts; rank ``r`` takes samples ``r, r + world, ...``."""
    if parts.validation is None:
        return {"val_loss": None}
    metric = parts.eval_metric
    n = len(parts.validation)
    mine = list(range(ctx.rank, n, ctx.world_size))
    # loss x units, units, then the metric's sum and count (one all-reduce for all)
    total = torch.zeros(2 if metric is None else 4, dtype=torch.float64, device=strategy.device)
    strategy.set_training(False)
    with torch.no_grad():
        for i in range(0, len(mine), micro_batch_size):
            batch = parts.collate([parts.validation[k] for k in mine[i : i + micro_batch_size]])
            batch = {k: v.to(strategy.device) for k, v in batch.items()}
            units = parts.count(batch)
            out = strategy.forward(batch)
            loss = out.loss.detach().to(torch.float64)
            total[0] += loss * units
            total[1] += units
            if metric is not None:
                got, count = metric.score(batch, out)
                total[2] += torch.as_tensor(got, dtype=torch.float64, device=total.device)
                total[3] += count
    strategy.set_training(True)
    if dist_on():
        dist.all_reduce(total)
    figures = {"val_loss": float(total[0] / total[1]) if total[1] > 0 else None}
    if metric is not None:
        figures[f"val_{metric.name}"] = float(total[2] / total[3]) if total[3] > 0 else None
    return figures


def generate_samples(strategy, tokenizer, spec) -> list[dict[str, str]]:
    """Greedy continuations (``max_new_tokens``) of ``spec.prompts``: ``[{"prompt", "completion"}]``. Every rank
    runs the same prompts (sharded experts gather collectively); the outputs agree."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    strategy.set_training(False)
    model = strategy.eval_module()  # the whole model (zebra: gathered from the owners for this evaluation)
    with torch.no_grad():
        for prompt in spec.prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(strategy.device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=spec.max_new_tokens, pad_token_id=pad)
            out.append({"prompt": prompt, "completion": tokenizer.decode(gen[0, ids.size(1):], skip_special_tokens=True)})
    strategy.set_training(True)
    return out

"""The training loop of one rank: set up the process, build the task and the engine, resume or seed,
train with metrics and checkpoints, then export and summarize (docs/design.md, "Recipes, tasks, worker
and CLI" and "One training step")."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..distributed import dist_on
from ..recipes import Recipe, lr_lambda, recipe_json
from ..atomic import atomic_save_dir, atomic_write
from ..distributed import seed_all
from ..tasks.base import TaskParts, WorkerContext, task_builder
from .batches import make_batch_plan
from .checkpoints import (check_resume_compatible, load_checkpoint, loop_state, read_latest, remove_unpublished,
                          save_checkpoint)
from .metrics import (METRICS_FILE, ExpertLoadTracker, Window, all_mean, append_row, metrics_row, progress_postfix,
                      runtime_metrics)
from .resume import trim_metrics
from .summary import SUMMARY_FILE, report_lines, run_report
from .zebra import check_zebra_recipe, try_zebra


@dataclass
class _Run:
    """One rank's run: what the loop's pieces share."""

    recipe: Recipe
    ctx: WorkerContext
    parts: TaskParts
    engine: Any
    tracker: ExpertLoadTracker | None  # None: the engine's runtime reports balance itself
    hetero: Any  # the runtime's heterogeneous controller, or None
    metrics_path: str


def run(recipe: Recipe, resume: bool = False) -> dict:
    """Train ``recipe`` on this process's rank (DeepSpeed initializes the process group)."""
    from tqdm.auto import tqdm

    t = recipe.training
    zebra = recipe.hexamoe_config is not None and recipe.hexamoe_config.enabled and recipe.hexamoe_config.zebra.enabled
    if zebra is True:
        check_zebra_recipe(recipe, resume)
    ctx, accel = _start_process(recipe, resume)
    t0 = time.perf_counter()
    parts, zebra_info = None, None
    if zebra:
        summary, parts, zebra_info = try_zebra(recipe, ctx, accel, resume, t0)
        if summary is not None:
            return summary
    r, step = _build(recipe, ctx, accel, parts)
    start_step = step
    plan = make_batch_plan(r.parts.train, t.micro_batch_size, ctx.rank, ctx.world_size, t.seed, r.hetero)
    batches = plan.batches(r.parts.train, r.parts.collate, start=step * t.grad_accum)
    if ctx.is_main:
        # every rank has loaded (load_checkpoint returns nowhere otherwise): only now change files
        dropped = trim_metrics(r.metrics_path, step)
        if dropped:
            print(f"[ds-hexamoe] {r.metrics_path}: dropped {dropped} unreadable row(s) (a run killed mid-write)",
                  flush=True)
        if resume:
            remove_unpublished(recipe.checkpoint_dir, step)
    setup_s = time.perf_counter() - t0
    bar = tqdm(total=t.steps, initial=step, desc=recipe.name, disable=not ctx.is_main, dynamic_ncols=True,
               unit="step", file=sys.stdout)
    train_t0 = time.perf_counter()
    first_loss, last_loss = _train(r, batches, step, bar, train_t0)
    bar.close()
    times = {"setup_s": setup_s, "train_s": time.perf_counter() - train_t0}
    return _finish(r, start_step, first_loss, last_loss, times, resume, zebra_info)


def _start_process(recipe: Recipe, resume: bool) -> tuple[WorkerContext, str]:
    """Join the process group, size CPU threads, write ``recipe.json``; fail early on a bad ``--resume``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    t = recipe.training
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    accel = get_accelerator().device_name()
    if accel == "cpu":
        threads = t.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    ctx = WorkerContext(rank=rank, world_size=world, local_rank=local_rank, output_dir=t.output_dir, resume=resume)
    _quiet_libraries(ctx.is_main)
    ckpt_dir = recipe.checkpoint_dir
    if ctx.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        atomic_write(os.path.join(t.output_dir, "recipe.json"), recipe_json(recipe))
    ctx.barrier()
    if resume and read_latest(ckpt_dir) is None:
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir!r} (no 'latest' file); run without --resume")
    return ctx, accel


def _build(recipe: Recipe, ctx: WorkerContext, accel: str, parts: TaskParts | None = None) -> tuple[_Run, int]:
    """The task (``parts``: already built), the engine (with the recipe's schedule), and the step to start
    from: a checkpoint's on ``--resume`` (its RNG states restored), else 0 with per-rank seeds."""
    t = recipe.training
    if parts is None:
        seed_all(t.seed)
        parts = task_builder(recipe)(recipe, ctx)
    ds_config = recipe.ds_config(ctx.world_size, accel)
    scheduler = None if "scheduler" in ds_config else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)))
    engine, _, _, _ = _initialize_fn()(model=parts.model, config=ds_config, lr_scheduler=scheduler)
    rt = getattr(engine, "hexamoe", None)
    tracker = None if callable(getattr(rt, "metrics", None)) else ExpertLoadTracker(engine.module, engine.device)
    step = 0
    if ctx.resume:
        state = load_checkpoint(engine, recipe.checkpoint_dir, ctx)
        check_resume_compatible(state, recipe, ctx.world_size, len(parts.train))
        step = int(state["step"])
    else:
        seed_all(t.seed + ctx.rank)  # per-rank streams for anything stochastic in training (dropout)
    hetero = getattr(rt, "hetero", None)
    metrics_path = os.path.join(t.output_dir, METRICS_FILE)
    return _Run(recipe, ctx, parts, engine, tracker, hetero, metrics_path), step


def _train(r: _Run, batches, step: int, bar, train_t0: float) -> tuple[float | None, float | None]:
    """Optimizer steps until ``training.steps``; returns the first and last step losses of this run."""
    t = r.recipe.training
    first_loss, last_loss = None, None
    window = Window()
    r.engine.train()
    while step < t.steps:
        lrs = r.engine.get_lr()
        lr = float(lrs[0]) if lrs else None  # the rate this step applies (the scheduler moves after it)
        step_loss, step_aux, units = _optimizer_step(r, batches)
        step += 1
        rt = getattr(r.engine, "hexamoe", None)
        if callable(getattr(rt, "after_step", None)):
            rt.after_step(step)
        loss, aux_loss, total_units = all_mean([step_loss, step_aux, float(units)], r.engine.device)
        window.add(loss, total_units * r.ctx.world_size)
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}; lower training.lr or check the data")
        eval_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
        if step % t.log_every == 0 or step == t.steps or step == 1 or eval_now:
            _log(r, step, loss, aux_loss, lr, window, eval_now, bar, train_t0)
        bar.update(1)
        if (t.save_every and step % t.save_every == 0) or step == t.steps:
            state = loop_state(r.recipe, step, r.ctx.world_size, len(r.parts.train))
            save_checkpoint(r.engine, r.recipe.checkpoint_dir, step, state, r.ctx, t.keep_checkpoints)
    return first_loss, last_loss


def _optimizer_step(r: _Run, batches) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``grad_accum`` micro-steps; returns this rank's mean loss, mean aux loss (NaN without one) and units."""
    t = r.recipe.training
    device = r.engine.device
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    step_aux = torch.zeros((), dtype=torch.float64, device=device)
    units = 0
    for _ in range(t.grad_accum):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        n_local = r.parts.count(batch)
        units += n_local
        out = r.engine(**batch)
        loss_for_grad = out.loss
        if r.hetero is not None:
            # uneven shares: weight each rank's mean loss by its share of the micro-batch's units, so
            # DeepSpeed's equal averaging over ranks gives the mean over the union
            from ..hetero import global_token_count, loss_scale

            loss_for_grad = out.loss * loss_scale(n_local, global_token_count(n_local), r.ctx.world_size)
        r.engine.backward(loss_for_grad)
        r.engine.step()
        step_loss += out.loss.detach().to(torch.float64) / t.grad_accum
        aux = getattr(out, "aux_loss", None)  # the router's balancing loss, already inside out.loss
        step_aux += aux.detach().to(torch.float64) / t.grad_accum if torch.is_tensor(aux) else math.nan
    return step_loss, step_aux, units


def _log(r: _Run, step: int, loss: float, aux_loss: float, lr: float | None, window: Window, eval_now: bool, bar,
         train_t0: float) -> None:
    """Append a metrics row (with the validation loss when due) and refresh the progress bar."""
    elapsed = time.perf_counter() - window.t0
    rtm = runtime_metrics(r.engine)
    bal = rtm.get("balance") if r.tracker is None else r.tracker.balance()
    rec = metrics_row(step, loss, aux_loss, lr, window, elapsed, r.parts.unit, bal, rtm,
                      time.perf_counter() - train_t0)
    window.reset()  # evaluation time counts into the next window, as it delays the next steps
    if eval_now:
        rec["val_loss"] = _evaluate(r)
    if r.ctx.is_main:
        append_row(r.metrics_path, rec)
        bar.set_postfix(progress_postfix(rec, r.parts.unit), refresh=False)


def _evaluate(r: _Run) -> float | None:
    """Token-weighted mean validation loss over the whole validation split (sharded over ranks)."""
    parts, ctx, engine, mbs = r.parts, r.ctx, r.engine, r.recipe.training.micro_batch_size
    if parts.validation is None:
        return None
    n = len(parts.validation)
    mine = list(range(ctx.rank, n, ctx.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), mbs):
            batch = parts.collate([parts.validation[k] for k in mine[i : i + mbs]])
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            units = parts.count(batch)
            loss = engine(**batch).loss.detach().to(torch.float64)
            total[0] += loss * units
            total[1] += units
    engine.train()
    if dist_on():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def _finish(r: _Run, start_step: int, first_loss, last_loss, times: dict, resume: bool,
            zebra_info: dict | None = None) -> dict:
    """Export the model, write ``summary.json`` and print the run's outcome (rank 0); ``zebra_info``: why
    ``"zebra": {"enabled": "auto"}`` left this run colocated."""
    t, ctx = r.recipe.training, r.ctx
    ckpt_dir = r.recipe.checkpoint_dir
    hf_dir = _export_hf(r, os.path.join(t.output_dir, "hf")) if t.export_hf else None
    summary = {"name": r.recipe.name, "steps": t.steps, "start_step": start_step, "world_size": ctx.world_size,
               "first_loss": first_loss, "last_loss": last_loss, **times,
               "checkpoint": os.path.join(ckpt_dir, read_latest(ckpt_dir) or ""), "hf_export": hf_dir,
               "resumed": resume}
    if zebra_info is not None:
        summary["zebra"] = {"ran": False, **zebra_info}
    if ctx.is_main:
        summary["report"] = run_report(r.engine, ctx.world_size, r.metrics_path, times["train_s"], t.steps - start_step,
                                       hf_dir)
        atomic_write(os.path.join(t.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        if first_loss is None:
            losses_msg = f"nothing left to train (checkpoint at step {start_step})"
        else:
            losses_msg = (f"first loss {first_loss:.4f} (step {start_step + 1}), last loss {last_loss:.4f} "
                          f"(step {t.steps})")
        print(f"[ds-hexamoe] {r.recipe.name}: {losses_msg}; {ctx.world_size} ranks, train {times['train_s']:.1f}s, "
              f"setup {times['setup_s']:.1f}s", flush=True)
        print(f"[ds-hexamoe] checkpoint: {summary['checkpoint']}", flush=True)
        if hf_dir:
            print(f"[ds-hexamoe] Hugging Face export: {hf_dir}", flush=True)
        for line in report_lines(summary["report"]) if summary["report"] else []:
            print(f"[ds-hexamoe] {line}", flush=True)
    return summary


def _export_hf(r: _Run, out: str) -> str | None:
    """``save_pretrained`` of model + processor into a temp folder, renamed onto ``out`` (all ranks call)."""
    rt = getattr(r.engine, "hexamoe", None)
    export = getattr(rt, "export_state_dict", None)
    state = export() if callable(export) else None  # may be collective (FSSDP gathers experts)
    if r.ctx.is_main:
        module = r.engine.module
        if state is None:
            state = module.state_dict()
        processor = r.parts.processor

        def write(tmp):
            module.save_pretrained(tmp, state_dict=state)
            if processor is not None and hasattr(processor, "save_pretrained"):
                processor.save_pretrained(tmp)

        atomic_save_dir(write, out)
    r.ctx.barrier()
    return out


def _initialize_fn():
    try:
        from ..integrations.deepspeed import initialize
    except ModuleNotFoundError as e:
        if e.name != "ds_hexamoe.integrations.deepspeed":
            raise
        import deepspeed

        return deepspeed.initialize
    return initialize


def _quiet_libraries(is_main: bool) -> None:
    import datasets
    import transformers

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    if not is_main:
        datasets.disable_progress_bars()

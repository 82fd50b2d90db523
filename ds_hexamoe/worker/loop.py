"""The training loop of one rank, the same whatever runs the step: set up the process, build the task and
the step strategy (:mod:`.strategy`: the colocated DeepSpeed step or the zebra pipeline), resume or seed,
train with metrics, evaluation and checkpoints, then export and summarize (docs/design.md, "Recipes, tasks,
worker and CLI" and "One training step")."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from ..atomic import atomic_write
from ..config import ConfigError
from ..distributed import seed_all
from ..recipes import Recipe, lr_lambda, recipe_json
from ..tasks.base import TaskParts, WorkerContext, task_builder
from .batches import BatchPlan
from .checkpoints import check_resume_compatible, loop_state, read_latest, remove_unpublished, trim_metrics
from .colocated import ColocatedStep
from .evaluation import evaluate, generate_samples
from .export import export_run
from .metrics import METRICS_FILE, Window, append_row, metrics_row, progress_postfix
from .monitor import RunMonitor
from .strategy import StepStrategy
from .summary import SUMMARY_FILE, report_lines


@dataclass
class _Run:
    """One rank's run: what the loop's pieces share."""

    recipe: Recipe
    ctx: WorkerContext
    parts: TaskParts
    strategy: StepStrategy
    metrics_path: str
    last_eval: dict = field(default_factory=dict)  # the latest validation figures, for the summary
    schedule_steps: int | None = None  # the steps the learning-rate schedule spans (a resume may keep an older one)
    monitor: RunMonitor | None = None  # TensorBoard / W&B writers (rank 0)
    params: dict = field(default_factory=dict)  # trainable and total parameter counts, for the summary


def _params(model: torch.nn.Module) -> dict:
    """Parameter elements of ``model`` that train, and in all."""
    from ..tasks.peft import parameter_counts

    trainable, total = parameter_counts(model)
    return {"trainable_params": trainable, "total_params": total}


def run(recipe: Recipe, resume: bool = False, reshape_schedule: bool = False) -> dict:
    """Train ``recipe`` on this process's rank (DeepSpeed initializes the process group); a resume keeps the
    checkpoint's learning-rate schedule unless ``reshape_schedule``."""
    from tqdm.auto import tqdm

    t = recipe.training
    zebra = recipe.hexamoe_config is not None and recipe.hexamoe_config.enabled and recipe.hexamoe_config.zebra.enabled
    if zebra is True:
        from .zebra import check_zebra_recipe

        check_zebra_recipe(recipe, resume)
    ctx, accel = _start_process(recipe, resume)
    t0 = time.perf_counter()
    seed_all(t.seed)
    parts = task_builder(recipe)(recipe, ctx)
    if recipe.peft is not None:  # adapters before the engine, so its optimizer sees only them
        from ..tasks.peft import apply_peft

        parts.model = apply_peft(parts.model, recipe, log=print if ctx.is_main else lambda line: None)
    params = _params(parts.model)  # before FSSDP replaces the experts by shards
    strategy = _strategy(recipe, ctx, accel, parts, resume, zebra)
    r = None
    try:
        r = _Run(recipe, ctx, parts, strategy, os.path.join(t.output_dir, METRICS_FILE), params=params)
        r.monitor = RunMonitor(recipe, ctx.is_main)
        step = _resume_or_seed(r, reshape_schedule)
        start_step = step
        shares, index = strategy.data_shares()
        batches = None
        if index is not None:
            plan = BatchPlan(parts.train, t.micro_batch_size, ctx.rank, ctx.world_size, t.seed, shares, index)
            batches = plan.batches(parts.train, parts.collate, start=step * t.grad_accum)
        if ctx.is_main:
            # every rank has loaded (a checkpoint load returns nowhere otherwise): only now change files
            dropped = trim_metrics(r.metrics_path, step)
            if dropped:
                print(f"[ds-hexamoe] {r.metrics_path}: dropped {dropped} unreadable row(s) (a run killed mid-write)",
                      flush=True)
            if resume:
                remove_unpublished(recipe.checkpoint_dir, step)
        setup_s = time.perf_counter() - t0
        desc = recipe.name if strategy.name == "colocated" else f"{recipe.name} ({strategy.name})"
        bar = tqdm(total=t.steps, initial=step, desc=desc, disable=not ctx.is_main, dynamic_ncols=True, unit="step",
                   file=sys.stdout)
        train_t0 = time.perf_counter()
        first_loss, last_loss = _train(r, batches, step, bar, train_t0)
        bar.close()
        times = {"setup_s": setup_s, "train_s": time.perf_counter() - train_t0}
        return _finish(r, start_step, first_loss, last_loss, times, resume)
    finally:
        strategy.close()
        if r is not None and r.monitor is not None:
            r.monitor.close()


def _strategy(recipe: Recipe, ctx: WorkerContext, accel: str, parts: TaskParts, resume: bool,
              zebra) -> StepStrategy:
    """The zebra pipeline when ``hexamoe.zebra`` asks for it (and, under ``"auto"``, the planner prefers
    it), else the colocated DeepSpeed step (with the reason ``"auto"`` gave, for the summary)."""
    info = None
    if zebra:
        from .zebra import ZebraStep, choose_zebra

        layout, stack, info = choose_zebra(recipe, ctx, accel, parts, resume)
        if layout is not None:
            seed_all(recipe.training.seed + ctx.rank)  # as the colocated run, before any training work
            return ZebraStep(recipe, ctx, parts, stack, layout, info, accel)
    if parts.whole_model is not None:  # "auto" chose the colocated step: the whole model, not the meta one
        parts.model, parts.whole_model = parts.whole_model(), None
    return ColocatedStep(recipe, ctx, accel, parts, info)


def _resume_or_seed(r: _Run, reshape_schedule: bool = False) -> int:
    """The step to start from: a checkpoint's on ``--resume`` (its RNG states restored, its schedule kept
    unless ``reshape_schedule``), else 0 with per-rank seeds."""
    t = r.recipe.training
    if r.ctx.resume:
        state = r.strategy.load()
        check_resume_compatible(state, r.recipe, r.ctx.world_size, len(r.parts.train))
        line = _resumed_schedule(r, state, reshape_schedule)
        if line and r.ctx.is_main:
            print(f"[ds-hexamoe] {line}", flush=True)
        return int(state["step"])
    seed_all(t.seed + r.ctx.rank)  # per-rank streams for anything stochastic in training (dropout)
    return 0


def _resumed_schedule(r: _Run, state: dict, reshape: bool) -> str | None:
    """Keep the learning-rate schedule the checkpoint was trained under when ``training.steps`` changed (a
    finished run extended would otherwise climb from its final rate back up), or with ``reshape`` stretch
    it over ``training.steps``; returns the line saying which (None when nothing changed)."""
    t, step = r.recipe.training, int(state["step"])
    saved = state.get("schedule_steps")
    # the colocated step's engine holds the scheduler; the zebra step its own
    sched = getattr(r.strategy, "lr_scheduler", None) or getattr(getattr(r.strategy, "engine", None),
                                                                 "lr_scheduler", None)
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):  # the DeepSpeed config's own scheduler
        return None
    if saved is None:
        return (f"the checkpoint does not record its learning-rate schedule's length (an earlier version wrote it): "
                f"the schedule follows training.steps={t.steps}")
    if saved == t.steps:
        return None
    base, old, new = sched.base_lrs[0], lr_lambda(replace(t, steps=saved)), lr_lambda(t)
    if reshape:
        return (f"--reshape-schedule: the learning-rate schedule is stretched from the checkpoint's {saved} steps "
                f"over training.steps={t.steps}: step {step + 2} trains at {base * new(step + 1):.3g} where the "
                f"checkpoint's schedule gives {base * old(step + 1):.3g}")
    r.schedule_steps = saved
    sched.lr_lambdas = [old for _ in sched.lr_lambdas]
    then = (f"steps {saved + 1}-{t.steps} train at its final rate {base * old(saved - 1):.3g}" if t.steps > saved
            else f"this run stops at step {t.steps}, before its end")
    return (f"the checkpoint's learning-rate schedule ({saved} steps) is kept: {then}; pass --reshape-schedule to "
            f"stretch it over training.steps={t.steps} instead")


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


def _train(r: _Run, batches, step: int, bar, train_t0: float) -> tuple[float | None, float | None]:
    """Optimizer steps until ``training.steps``; returns the first and last step losses of this run."""
    t, strategy = r.recipe.training, r.strategy
    first_loss, last_loss = None, None
    window = Window()
    strategy.set_training(True)
    while step < t.steps:
        lr = strategy.lr()
        step += 1
        res = strategy.step(batches, step)
        window.add(res.loss, res.units)
        first_loss = res.loss if first_loss is None else first_loss
        last_loss = res.loss
        if not math.isfinite(res.loss):
            raise FloatingPointError(f"step {step}: loss is {res.loss}; lower training.lr or check the data")
        eval_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
        if step % t.log_every == 0 or step == t.steps or step == 1 or eval_now:
            _log(r, step, res.loss, res.aux_loss, lr, window, eval_now, bar, train_t0)
        bar.update(1)
        if strategy.keeps_checkpoints and ((t.save_every and step % t.save_every == 0) or step == t.steps):
            strategy.save(step, loop_state(r.recipe, step, r.ctx.world_size, len(r.parts.train), r.schedule_steps))
    return first_loss, last_loss


def _log(r: _Run, step: int, loss: float, aux_loss: float, lr: float | None, window: Window, eval_now: bool, bar,
         train_t0: float) -> None:
    """Append a metrics row (with the validation figures when due) and refresh the progress bar."""
    elapsed = time.perf_counter() - window.t0
    bal, rtm, extra = r.strategy.row_metrics()
    rec = metrics_row(step, loss, aux_loss, lr, window, elapsed, r.parts.unit, bal, rtm,
                      time.perf_counter() - train_t0)
    rec.update(extra)
    window.reset()  # evaluation time counts into the next window, as it delays the next steps
    if eval_now:
        figures = evaluate(r.strategy, r.parts, r.ctx, r.recipe.training.micro_batch_size)
        rec.update(figures)
        r.last_eval = {"eval_step": step, **figures}
        if r.recipe.training.generate is not None:  # collective: every rank generates
            rec["generations"] = generate_samples(r.strategy, r.parts.processor, r.recipe.training.generate)
    if r.ctx.is_main:
        append_row(r.metrics_path, rec)
        r.monitor.log(rec)
        for g in rec.get("generations", []):
            bar.write(f"[ds-hexamoe] step {step} generate: {g['prompt']!r} -> {g['completion']!r}")
        bar.set_postfix(progress_postfix(rec, r.parts.unit), refresh=False)


def _finish(r: _Run, start_step: int, first_loss, last_loss, times: dict, resume: bool) -> dict:
    """Export the model, write ``summary.json`` and print the run's outcome (rank 0)."""
    t, ctx, strategy = r.recipe.training, r.ctx, r.strategy
    ckpt_dir = r.recipe.checkpoint_dir
    exports = export_run(r)
    hf_dir = exports["hf_export"]
    checkpoint = os.path.join(ckpt_dir, read_latest(ckpt_dir) or "") if strategy.keeps_checkpoints else None
    summary = {"name": r.recipe.name, "steps": t.steps, "start_step": start_step, "world_size": ctx.world_size,
               "first_loss": first_loss, "last_loss": last_loss, **times, "checkpoint": checkpoint,
               **exports, "resumed": resume, **r.params, **r.last_eval, **strategy.summary_fields()}
    if ctx.is_main:
        summary["report"] = strategy.report(r.metrics_path, times["train_s"], t.steps - start_step, hf_dir)
        atomic_write(os.path.join(t.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        _print_outcome(r, summary, start_step, times)
    return summary


def _print_outcome(r: _Run, summary: dict, start_step: int, times: dict) -> None:
    t, name = r.recipe.training, r.recipe.name
    for line in r.strategy.header_lines():
        print(f"[ds-hexamoe] {line}", flush=True)
    first_loss, last_loss = summary["first_loss"], summary["last_loss"]
    if first_loss is None:
        losses_msg = f"nothing left to train (checkpoint at step {start_step})"
    else:
        losses_msg = f"first loss {first_loss:.4f} (step {start_step + 1}), last loss {last_loss:.4f} (step {t.steps})"
    print(f"[ds-hexamoe] {name}: {losses_msg}; {summary['world_size']} ranks, train {times['train_s']:.1f}s, "
          f"setup {times['setup_s']:.1f}s", flush=True)
    if r.last_eval:
        figures = ", ".join(f"{k[4:]} {v:.4f}" for k, v in r.last_eval.items() if k.startswith("val_") and v is not None)
        print(f"[ds-hexamoe] {name}: validation {figures} (step {r.last_eval['eval_step']})", flush=True)
    if summary["checkpoint"] is not None:
        print(f"[ds-hexamoe] checkpoint: {summary['checkpoint']}", flush=True)
    if summary.get("adapter_export"):
        print(f"[ds-hexamoe] LoRA adapters (PeftModel.from_pretrained(base, path) loads them): "
              f"{summary['adapter_export']}", flush=True)
    if summary["hf_export"]:
        merged = " (base + LoRA merged)" if summary.get("adapter_export") else ""
        print(f"[ds-hexamoe] Hugging Face export{merged} (from_pretrained loads it): {summary['hf_export']}", flush=True)
    for line in report_lines(summary["report"]) if summary["report"] else []:
        print(f"[ds-hexamoe] {line}", flush=True)


def _quiet_libraries(is_main: bool) -> None:
    import datasets
    import transformers

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    if not is_main:
        datasets.disable_progress_bars()

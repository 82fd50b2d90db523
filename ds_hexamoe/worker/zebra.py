"""``ds-hexamoe train`` with attention/expert disaggregation (``hexamoe.zebra``; docs/modes.md, "Zebra").

Attention ranks run the Hugging Face model's dense part on their shares of each global micro-batch; expert
ranks host whole experts; :class:`~ds_hexamoe.parallel.zebra.ZebraPipeline` pipelines micro-batches
between them. There is no DeepSpeed engine on this path: each rank steps AdamW (the recipe's rates, betas,
decay, schedule and gradient clipping over the global norm) on the parameters it owns, dense ones on the
attention ranks (their gradients summed over attention ranks), experts on their hosts. The export gathers
the full model on rank 0. Checkpoints and ``--resume`` are not supported here (named before any work).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from ..apportion import largest_remainder
from ..config import ConfigError
from ..parallel.zebra import ZebraLayout, ZebraPipeline
from ..parallel.zebra_hf import HFZebraStack
from ..recipes import Recipe, lr_lambda
from ..atomic import atomic_save_dir, atomic_write
from ..distributed import seed_all
from ..tasks.base import TaskParts, WorkerContext
from .metrics import METRICS_FILE, Window, append_row, metrics_row, progress_postfix
from .summary import SUMMARY_FILE


def check_zebra_recipe(recipe: Recipe, resume: bool) -> None:
    """What this path cannot do, named before any work."""
    t = recipe.training
    if resume:
        raise ConfigError("--resume: hexamoe.zebra runs keep no checkpoints to resume from; run without --resume")
    if t.save_every:
        raise ConfigError(f"training.save_every: got {t.save_every}; hexamoe.zebra writes no checkpoints (only the "
                          "Hugging Face export at the end): set it to 0")
    if t.dtype != "fp32":
        raise ConfigError(f'training.dtype: got {t.dtype!r}; hexamoe.zebra trains in "fp32" (no loss scaling or '
                          "master weights on this path)")
    if t.eval_every:
        raise ConfigError(f"training.eval_every: got {t.eval_every}; hexamoe.zebra does not evaluate during training: "
                          "set it to 0")


def zebra_layout(recipe: Recipe, model, ds_config: dict,
                 world: int) -> tuple[ZebraLayout | None, dict, HFZebraStack | None]:
    """The split to run (None: ``"auto"`` and the planner's simulator prefers the colocated plan), what
    decided it, for the run's report, and ``model`` cut into the pipeline's segments (None: it cannot be)."""
    from ..hetero import PlanState
    from ..hetero.planning import global_micro_batch

    cfg = recipe.hexamoe_config
    z = cfg.zebra
    gb = global_micro_batch(ds_config, world)
    try:
        stack = HFZebraStack(model)
    except ValueError as e:  # a model the pipeline cannot cut: "auto" trains colocated, true is an error
        if z.enabled == "auto":
            return None, {"source": "model", "wins": False, "why": str(e)}, None
        raise ConfigError(f"hexamoe.zebra.enabled: {e} (or set hexamoe.zebra.enabled to false)") from None
    if z.explicit:
        layout = ZebraLayout(tuple(z.attention_ranks), tuple(z.shares), tuple(z.expert_owner), z.micro_batches or 2)
        _check_layout(layout, world, stack, gb, "hexamoe.zebra")
        return layout, {"source": "hexamoe.zebra"}, stack
    ctl = PlanState.from_config(model, cfg, ds_config)
    advice = ctl.plan.meta.get("zebra") if ctl is not None else None
    if advice is None:
        if z.enabled == "auto":
            return None, {"source": "planner", "wins": False, "why": "no split fits the batch"}, stack
        raise ConfigError(f"hexamoe.zebra.enabled: the planner found no split of {world} ranks for a global micro-batch of "
                          f"{gb} samples (each attention rank needs >= micro_batches samples); give the split "
                          "(attention_ranks, shares, expert_owner) or a larger training.micro_batch_size")
    info = {"source": "planner", "wins": bool(advice["wins"]), "speedup_over_plan": advice["speedup_over_plan"],
            "predicted_step_s": advice["step_time"]}
    if z.enabled == "auto" and not advice["wins"]:
        return None, info, stack
    counts = largest_remainder(stack.c.experts, advice["expert_fraction"], what="zebra expert_fraction")
    owner = tuple(r for r, n in zip(advice["expert_ranks"], counts) for _ in range(n))
    layout = ZebraLayout(tuple(advice["attention_ranks"]), tuple(advice["shares"]), owner,
                         z.micro_batches or advice["micro_batches"])
    _check_layout(layout, world, stack, gb, "hexamoe.zebra (the planner's split)")
    return layout, info, stack


def _check_layout(layout: ZebraLayout, world: int, stack: HFZebraStack, gb: int, where: str) -> None:
    try:
        layout.check(world, stack.c.experts)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if sum(layout.shares) != gb:
        raise ConfigError(f"{where}.shares: {list(layout.shares)} add up to {sum(layout.shares)}; expected the global "
                          f"micro-batch, training.micro_batch_size x ranks = {gb} samples")


class _Order:
    """The global sample order: a seeded permutation per epoch, cut into global micro-batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self.perm = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self._perm(self.epoch)
            take = min(k - len(out), self.n - self.pos)
            out += self.perm[self.pos:self.pos + take]
            self.pos += take
        return out


def _batch(parts: TaskParts, rows: list[int]) -> dict:
    batch = parts.collate([parts.train[i] for i in rows])
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        # causal attention makes right padding harmless (labels -100 there); other padding is not
        raise ConfigError("data: hexamoe.zebra needs unpadded or right-padded blocks (the pipeline attends causally "
                          "without an attention mask); the collate produced left or inner padding")
    return batch


def _clip(params: list[torch.Tensor], max_norm: float, counted: bool) -> float:
    """Global gradient norm over the ranks' disjoint parameters (``counted``: this rank's dense copy is the one
    summed), clipped to ``max_norm`` (0: measure only)."""
    sq = torch.zeros((), dtype=torch.float64)
    if counted:
        for p in params:
            if p.grad is not None:
                sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def run_zebra(recipe: Recipe, ctx: WorkerContext, parts: TaskParts, stack: HFZebraStack, layout: ZebraLayout,
              info: dict, setup_s: float) -> dict:
    """Train ``recipe`` disaggregated (``stack``: ``parts.model`` cut into segments); every rank calls it.
    Returns the run's summary (written by rank 0)."""
    from tqdm.auto import tqdm

    t = recipe.training
    gb = sum(layout.shares)
    pipe = ZebraPipeline(stack, layout, gb)
    att = list(layout.attention_ranks)
    attending = ctx.rank in att
    mine = layout.rows(ctx.rank)
    params = stack.dense_parameters() if attending else stack.expert_parameters()
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    order = _Order(len(parts.train), t.seed)
    metrics_path = os.path.join(t.output_dir, METRICS_FILE)
    bar = tqdm(total=t.steps, desc=f"{recipe.name} (zebra)", disable=not ctx.is_main, dynamic_ncols=True, unit="step",
               file=sys.stdout)
    parts.model.train()
    window, first, last, t0 = Window(), None, None, time.perf_counter()
    for step in range(1, t.steps + 1):
        lr = sched.get_last_lr()[0]
        stats = torch.zeros(2, dtype=torch.float64)  # global mean loss (shares add up), units
        for _ in range(t.grad_accum):
            rows = order.take(gb)[mine]
            if attending:
                batch = _batch(parts, rows)
                stats[0] += pipe.step(batch["input_ids"], batch["labels"]) / t.grad_accum
                stats[1] += parts.count(batch)
            else:
                pipe.step()
        if t.grad_accum > 1:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(t.grad_accum)
        _clip(params, t.max_grad_norm, counted=not attending or ctx.rank == att[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
        dist.all_reduce(stats)
        loss = float(stats[0])
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}; lower training.lr or check the data")
        first = loss if first is None else first
        last = loss
        window.add(loss, float(stats[1]))
        if step % t.log_every == 0 or step in (1, t.steps):
            rec = metrics_row(step, loss, math.nan, lr, window, time.perf_counter() - window.t0, parts.unit, None,
                              {}, time.perf_counter() - t0)
            rec["zebra"] = True
            window.reset()
            if ctx.is_main:
                append_row(metrics_path, rec)
                bar.set_postfix(progress_postfix(rec, parts.unit), refresh=False)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t0
    hf_dir = _export(parts, stack, layout, ctx, os.path.join(t.output_dir, "hf")) if t.export_hf else None
    summary = {"name": recipe.name, "steps": t.steps, "start_step": 0, "world_size": ctx.world_size,
               "first_loss": first, "last_loss": last, "setup_s": setup_s, "train_s": train_s, "checkpoint": None,
               "hf_export": hf_dir, "resumed": False,
               "zebra": {"attention_ranks": att, "shares": list(layout.shares), "expert_owner": list(layout.expert_owner),
                         "micro_batches": layout.micro_batches, "ran": True, **info}}
    if ctx.is_main:
        atomic_write(os.path.join(t.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        print(f"[ds-hexamoe] {recipe.name}: zebra, attention ranks {att} (shares {list(layout.shares)}), expert "
              f"owners {list(layout.expert_owner)}, {layout.micro_batches} micro-batches ({info['source']})", flush=True)
        print(f"[ds-hexamoe] {recipe.name}: first loss {first:.4f} (step 1), last loss {last:.4f} (step {t.steps}); "
              f"{ctx.world_size} ranks, train {train_s:.1f}s, setup {setup_s:.1f}s", flush=True)
        if hf_dir:
            print(f"[ds-hexamoe] Hugging Face export: {hf_dir}", flush=True)
    return summary


def try_zebra(recipe: Recipe, ctx: WorkerContext, accel: str, resume: bool,
              t0: float) -> tuple[dict | None, TaskParts, dict]:
    """Run disaggregated when ``hexamoe.zebra`` says so (``"auto"``: when the planner's simulator prefers it and
    the recipe allows it); returns ``(summary, parts, info)``, the summary None for the colocated loop to
    train (``info``: what decided it)."""
    from ..tasks.base import task_builder

    t, z = recipe.training, recipe.hexamoe_config.zebra
    seed_all(t.seed)
    parts = task_builder(recipe)(recipe, ctx)
    layout, info, stack = zebra_layout(recipe, parts.model, recipe.ds_config(ctx.world_size, accel), ctx.world_size)
    if layout is not None and z.enabled == "auto":
        try:
            check_zebra_recipe(recipe, resume)
        except ConfigError as e:
            layout, info = None, {**info, "why": str(e)}
    if layout is None:
        if ctx.is_main:
            print(f"[ds-hexamoe] hexamoe.zebra \"auto\": the colocated plan runs ({json.dumps(info)})", flush=True)
        return None, parts, info
    seed_all(t.seed + ctx.rank)
    clock = _emulation(recipe, ctx)
    try:
        return run_zebra(recipe, ctx, parts, stack, layout, info, time.perf_counter() - t0), parts, info
    finally:
        if clock is not None:
            clock.uninstall()


def _emulation(recipe: Recipe, ctx: WorkerContext):
    """The slowdown clock of this rank's declared profile, installed by the colocated run's rule
    (``hetero.slowdown.install_clock``), so both paths emulate the same devices; None when nothing is slowed."""
    from ..hetero.resolve import load_declared
    from ..hetero.slowdown import install_clock

    cfg = recipe.hexamoe_config
    if cfg.profile != "declared":
        return None
    return install_clock(load_declared(cfg, ctx.world_size), ctx.rank)


def _export(parts: TaskParts, stack: HFZebraStack, layout: ZebraLayout, ctx: WorkerContext, out: str) -> str:
    """The full model on rank 0 (dense tensors from the first attention rank, expert rows from their hosts,
    summed with zeros elsewhere: exact), saved with ``save_pretrained`` into a temporary folder renamed onto ``out``."""
    model = parts.model
    experts = {id(p) for p in stack.expert_parameters()}
    hosted = layout.hosted(ctx.rank)
    first_att = layout.attention_ranks[0]
    gathered = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            mine = torch.zeros_like(p)
            if id(p) in experts:
                if hosted:
                    ids = torch.as_tensor(hosted)
                    mine[ids] = p[ids]
            elif ctx.rank == first_att:
                mine.copy_(p)
            dist.all_reduce(mine)
            gathered[name] = mine
    if ctx.is_main:
        state = {k: gathered.get(k, v) for k, v in model.state_dict().items()}

        def write(tmp):
            model.save_pretrained(tmp, state_dict=state)
            if parts.processor is not None and hasattr(parts.processor, "save_pretrained"):
                parts.processor.save_pretrained(tmp)

        atomic_save_dir(write, out)
    ctx.barrier()
    return out

"""``ds-hexamoe train`` with attention/expert disaggregation (``hexamoe.zebra``; docs/modes.md, "Zebra").

Attention ranks run the Hugging Face model's dense part on their shares of each global micro-batch; expert
ranks host whole experts; :class:`~ds_hexamoe.parallel.zebra.ZebraPipeline` pipelines micro-batches
between them. :class:`ZebraStep` is the training loop's step strategy (:mod:`.strategy`) for it. There is
no DeepSpeed engine on this path, so it keeps its own optimizer: each rank steps AdamW (the recipe's rates,
betas, decay, schedule and gradient clipping over the global norm) on the parameters it owns, dense ones on
the attention ranks (their gradients summed over attention ranks), experts on their hosts. The export
gathers the full model on rank 0. Checkpoints, ``--resume`` and evaluation are not supported here (named
before any work).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..apportion import largest_remainder
from ..config import ConfigError
from ..parallel.zebra import ZebraLayout, ZebraPipeline
from ..parallel.zebra_hf import HFZebraStack
from ..recipes import Recipe, lr_lambda
from ..recipes.checks import check_zebra
from ..tasks.base import TaskParts, WorkerContext
from .strategy import StepResult


def check_zebra_recipe(recipe: Recipe, resume: bool) -> None:
    """What this path cannot do, named before any work (the recipe's part also by recipe validation)."""
    if resume:
        raise ConfigError("--resume: hexamoe.zebra runs keep no checkpoints to resume from; run without --resume")
    check_zebra(recipe, auto=True)


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


def choose_zebra(recipe: Recipe, ctx: WorkerContext, accel: str, parts: TaskParts,
                 resume: bool) -> tuple[ZebraLayout | None, HFZebraStack | None, dict]:
    """The split to train with when ``hexamoe.zebra`` says so (``"auto"``: when the planner's simulator prefers
    it and the recipe allows it), the model cut into segments, and what decided it; layout None: the
    colocated step trains (every rank decides alike)."""
    z = recipe.hexamoe_config.zebra
    layout, info, stack = zebra_layout(recipe, parts.model, recipe.ds_config(ctx.world_size, accel), ctx.world_size)
    if layout is not None and z.enabled == "auto":
        try:
            check_zebra_recipe(recipe, resume)
        except ConfigError as e:
            layout, info = None, {**info, "why": str(e)}
    if layout is None and ctx.is_main:
        print(f"[ds-hexamoe] hexamoe.zebra \"auto\": the colocated plan runs ({json.dumps(info)})", flush=True)
    return layout, stack, info


def _check_padding(batch: dict) -> None:
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        # causal attention makes right padding harmless (labels -100 there); other padding is not
        raise ConfigError("data: hexamoe.zebra needs unpadded or right-padded blocks (the pipeline attends causally "
                          "without an attention mask); the collate produced left or inner padding")


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


class ZebraStep:
    """:class:`~.strategy.StepStrategy` of the zebra pipeline (``stack``: ``parts.model`` cut into segments).
    Build it on every rank (the pipeline's process groups are created collectively)."""

    name = "zebra"
    keeps_checkpoints = False

    def __init__(self, recipe: Recipe, ctx: WorkerContext, parts: TaskParts, stack: HFZebraStack,
                 layout: ZebraLayout, info: dict):
        t = recipe.training
        self.recipe, self.ctx, self.parts, self.stack, self.layout, self.info = recipe, ctx, parts, stack, layout, info
        self.clock = _emulation(recipe, ctx)
        self.pipe = ZebraPipeline(stack, layout, sum(layout.shares))
        self.attending = ctx.rank in layout.attention_ranks
        # each rank steps what it owns: the dense part on attention ranks, its experts on an expert rank
        self.params = stack.dense_parameters() if self.attending else stack.expert_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                     weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t))
        self.module, self.device = parts.model, torch.device("cpu")

    def data_shares(self):
        return list(self.layout.shares), self.layout.share_index(self.ctx.rank)

    def lr(self) -> float | None:
        return self.sched.get_last_lr()[0]

    def step(self, batches: Iterator[dict] | None, step: int) -> StepResult:
        t, att = self.recipe.training, self.layout.attention_ranks
        stats = torch.zeros(2, dtype=torch.float64)  # global mean loss (shares add up), units
        for _ in range(t.grad_accum):
            if self.attending:
                batch = next(batches)
                _check_padding(batch)
                stats[0] += self.pipe.step(batch["input_ids"], batch["labels"]) / t.grad_accum
                stats[1] += self.parts.count(batch)
            else:
                self.pipe.step()
        if t.grad_accum > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(t.grad_accum)
        _clip(self.params, t.max_grad_norm, counted=not self.attending or self.ctx.rank == att[0])
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=False)
        dist.all_reduce(stats)
        return StepResult(float(stats[0]), math.nan, float(stats[1]))

    def row_metrics(self) -> tuple[float | None, dict, dict]:
        return None, {}, {"zebra": True}

    def forward(self, batch: dict):
        raise NotImplementedError("hexamoe.zebra does not evaluate (training.eval_every is refused)")

    def set_training(self, on: bool) -> None:
        self.module.train(on)

    def save(self, step: int, state: dict) -> None:
        raise NotImplementedError("hexamoe.zebra keeps no checkpoints (training.save_every is refused)")

    def load(self) -> dict:
        raise NotImplementedError("hexamoe.zebra keeps no checkpoints (--resume is refused)")

    def export_state(self) -> dict | None:
        """The full model on rank 0: dense tensors from the first attention rank, expert rows from their
        hosts, summed with zeros elsewhere (exact)."""
        model = self.module
        experts = {id(p) for p in self.stack.expert_parameters()}
        hosted = self.layout.hosted(self.ctx.rank)
        gathered = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                mine = torch.zeros_like(p)
                if id(p) in experts:
                    if hosted:
                        ids = torch.as_tensor(hosted)
                        mine[ids] = p[ids]
                elif self.ctx.rank == self.layout.attention_ranks[0]:
                    mine.copy_(p)
                dist.all_reduce(mine)
                gathered[name] = mine
        return {k: gathered.get(k, v) for k, v in model.state_dict().items()}

    def header_lines(self) -> list[str]:
        lay = self.layout
        return [f"{self.recipe.name}: zebra, attention ranks {list(lay.attention_ranks)} (shares {list(lay.shares)}), "
                f"expert owners {list(lay.expert_owner)}, {lay.micro_batches} micro-batches ({self.info['source']})"]

    def summary_fields(self) -> dict:
        lay = self.layout
        return {"zebra": {"attention_ranks": list(lay.attention_ranks), "shares": list(lay.shares),
                          "expert_owner": list(lay.expert_owner), "micro_batches": lay.micro_batches, "ran": True,
                          **self.info}}

    def report(self, metrics_path: str, train_s: float, steps: int, hf_dir: str | None) -> dict | None:
        return None

    def close(self) -> None:
        if self.clock is not None:
            self.clock.uninstall()


def _emulation(recipe: Recipe, ctx: WorkerContext):
    """The slowdown clock of this rank's declared profile, installed by the colocated run's rule
    (``hetero.slowdown.install_clock``), so both paths emulate the same devices; None when nothing is slowed."""
    from ..hetero.resolve import load_declared
    from ..hetero.slowdown import install_clock

    cfg = recipe.hexamoe_config
    if cfg.profile != "declared":
        return None
    return install_clock(load_declared(cfg, ctx.world_size), ctx.rank)

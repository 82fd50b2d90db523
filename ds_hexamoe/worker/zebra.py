"""``ds-hexamoe train`` with attention/expert disaggregation (``hexamoe.zebra``; docs/modes.md, "Zebra").

Attention ranks run the Hugging Face model's dense part on their shares of each global micro-batch; expert
ranks host whole experts; :class:`~ds_hexamoe.parallel.zebra.ZebraPipeline` pipelines micro-batches
between them. :class:`ZebraStep` is the training loop's step strategy (:mod:`.strategy`) for it. There is
no DeepSpeed engine on this path, so each rank keeps only the parameters it owns (:mod:`..parallel.zebra_parts`)
and its own optimizer (:mod:`.zebra_optim`: AdamW with the recipe's rates, schedule and global-norm clipping,
fp32 masters in bf16/fp16, loss scaling in fp16), dense parameters on the attention ranks (their gradients
summed over attention ranks), experts on their hosts. Checkpoints (:mod:`.zebra_ckpt`) share the colocated
path's manifest and ``--resume``; the export and evaluation gather the full model.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..apportion import largest_remainder
from ..config import ConfigError
from ..parallel.zebra import ZebraLayout, ZebraPipeline
from ..parallel.zebra_hf import HFZebraStack
from ..parallel.zebra_load import read_part
from ..parallel.zebra_parts import (expert_layers, full_copy, gather_state, init_part, keep_part, move_part,
                                    param_bytes)
from ..recipes import Recipe
from ..recipes.checks import check_zebra
from ..tasks.base import TaskParts, WorkerContext
from .checkpoints import load_checkpoint, save_checkpoint
from .strategy import StepResult
from .zebra_ckpt import ZebraFiles, check_same_world
from .zebra_optim import ZebraOptimizer


def check_zebra_recipe(recipe: Recipe, resume: bool) -> None:
    """What this path cannot do, named before any work (the recipe's part also by recipe validation)."""
    check_zebra(recipe, auto=True)


def check_zebra_model(recipe: Recipe, world: int | None) -> None:
    """Before launch: a recipe's explicit split (``hexamoe.zebra`` with ``attention_ranks``) against its model built
    on the meta device (nothing read or allocated): per-layer owners one row per MoE layer, one owner per expert,
    and, when the launch's rank count ``world`` is known (``launcher.nproc`` on one node), the ranks and shares."""
    from ..tasks.causal_lm import build_model

    cfg = recipe.hexamoe_config
    if cfg is None or not cfg.enabled or cfg.zebra.enabled is False or not cfg.zebra.explicit:
        return
    z = cfg.zebra
    try:
        stack = HFZebraStack(build_model(recipe, None, meta=True))
    except ValueError as e:
        if z.enabled == "auto":
            return  # the worker trains colocated and says why
        raise ConfigError(f"hexamoe.zebra.enabled: {e} (or set hexamoe.zebra.enabled to false)") from None
    layout = _explicit_layout(z)
    if world is not None:
        from ..hetero.planning import global_micro_batch

        _check_layout(layout, world, stack, global_micro_batch(recipe.ds_config(world, "cpu"), world))
        return
    try:  # ranks unknown before the launcher reads its hostfile: the shape of the owners only
        layout.check(max([*layout.attention_ranks, *layout.hosts]) + 1, stack.c.experts, stack.c.layers)
    except ValueError as e:
        raise ConfigError(f"hexamoe.{e}") from None


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
        layout = _explicit_layout(z)
        return _checked(layout, world, stack, gb), {"source": "hexamoe.zebra"}, stack
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
    owner = advice.get("expert_owner")  # Asym-EA's whole experts per layer; None: fractions of the experts
    if owner is not None:
        owner = owner_rows(owner)
    else:
        counts = largest_remainder(stack.c.experts, advice["expert_fraction"], what="zebra expert_fraction")
        owner = tuple(r for r, n in zip(advice["expert_ranks"], counts) for _ in range(n))
    layout = ZebraLayout(tuple(advice["attention_ranks"]), tuple(advice["shares"]), owner,
                         z.micro_batches or advice["micro_batches"])
    return _checked(layout, world, stack, gb, " (the planner's split)"), info, stack


def _explicit_layout(z) -> ZebraLayout:
    """The split a recipe gives (``hexamoe.zebra`` with ``attention_ranks``, ``shares``, ``expert_owner``)."""
    return ZebraLayout(tuple(z.attention_ranks), tuple(z.shares), owner_rows(z.expert_owner), z.micro_batches or 2)


def owner_rows(owner) -> tuple:
    """``expert_owner`` (a flat list, or one list per layer) as tuples, as :class:`ZebraLayout` takes it."""
    if not owner or not isinstance(owner[0], (list, tuple)):
        return tuple(int(r) for r in owner)
    return tuple(tuple(int(r) for r in row) for row in owner)


def _checked(layout: ZebraLayout, world: int, stack: HFZebraStack, gb: int, note: str = "") -> ZebraLayout:
    """``layout`` checked, with one flat owner list when every layer has the same owners (the plain layout: the
    parts and checkpoint split a flat list gives)."""
    _check_layout(layout, world, stack, gb, note)
    if layout.per_layer and len(set(layout.expert_owner)) == 1:
        return dataclasses.replace(layout, expert_owner=layout.expert_owner[0])
    return layout


def _check_layout(layout: ZebraLayout, world: int, stack: HFZebraStack, gb: int, note: str = "") -> None:
    """``note``: where the split came from when it is not the recipe's (named after the field)."""
    try:
        layout.check(world, stack.c.experts, stack.c.layers)
    except ValueError as e:  # the layout names its zebra.* field; the recipe's is hexamoe.zebra.*
        raise ConfigError(f"hexamoe.{e}{note}") from None
    if sum(layout.shares) != gb:
        raise ConfigError(f"hexamoe.zebra.shares{note}: {list(layout.shares)} add up to {sum(layout.shares)}; expected "
                          f"the global micro-batch, training.micro_batch_size x ranks = {gb} samples")


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


def _plain(owner: tuple) -> list:
    """``expert_owner`` as JSON lists (per layer: a list of lists), for the report and the checkpoint's split."""
    return [list(o) if isinstance(o, tuple) else o for o in owner]


def _check_padding(batch: dict, balance: bool) -> None:
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        # causal attention makes right padding harmless (labels -100 there); other padding is not
        raise ConfigError("data: hexamoe.zebra needs unpadded or right-padded blocks (the pipeline attends causally "
                          "without an attention mask); the collate produced left or inner padding")
    if balance and mask is not None and not bool(mask.all()):
        # transformers leaves padded rows out of the router's statistics; the pipeline sees no mask
        raise ConfigError("data: hexamoe.zebra with the router's auxiliary loss (model.config.output_router_logits) "
                          "needs unpadded blocks; pack the data or set output_router_logits to false")


class ZebraStep:
    """:class:`~.strategy.StepStrategy` of the zebra pipeline (``stack``: ``parts.model`` cut into segments).
    Build it on every rank (the pipeline's process groups are created collectively)."""

    name = "zebra"
    keeps_checkpoints = True

    def __init__(self, recipe: Recipe, ctx: WorkerContext, parts: TaskParts, stack: HFZebraStack,
                 layout: ZebraLayout, info: dict, accel: str = "cpu"):
        t = recipe.training
        self.recipe, self.ctx, self.parts, self.stack, self.layout, self.info = recipe, ctx, parts, stack, layout, info
        self.clock = _emulation(recipe, ctx)
        self.attending = ctx.rank in layout.attention_ranks
        keep_part(stack, layout, ctx.rank)  # each rank holds what it owns, nothing else
        self.read = None  # the checkpoint entries this rank read (built on the meta device), else None
        if parts.whole_model is not None:  # built on the meta device: this rank builds only its part
            if recipe.model.path is not None:
                self.read = read_part(stack, layout, ctx.rank, recipe.model.path)
            else:
                init_part(stack, layout, ctx.rank, recipe.training.seed)
        # the part on this rank's device (cuda:LOCAL_RANK under the launcher: NCCL groups), built on the host
        self.device = torch.device("cpu") if accel == "cpu" else torch.device(accel, ctx.local_rank)
        move_part(parts.model, self.device)
        # after the parts are real: the pipeline takes its device and wire dtype from what this rank holds
        self.pipe = ZebraPipeline(stack, layout, sum(layout.shares))
        if stack.balance is not None:  # the router's aux loss: its statistics summed over the attention ranks
            stack.balance.bind(self.pipe.dense_group)
        experts = expert_layers(stack)
        # each rank steps what it holds: the dense part on attention ranks, the experts it hosts in each layer;
        # in the global norm a dense tensor counts once (the first attention rank), an expert on its host
        named = [(n, p) for n, p in parts.model.named_parameters() if p.device.type != "meta"]
        self.counted = [id(p) in experts or ctx.rank == layout.attention_ranks[0] for _, p in named]
        fp16 = recipe.ds_config(ctx.world_size, "cpu").get("fp16", {}) if t.dtype == "fp16" else None
        self.opt = ZebraOptimizer(named, t, fp16)
        self.lr_scheduler = self.opt.sched  # a resume keeps the checkpoint's schedule (loop._resumed_schedule)
        split = {"attention_ranks": list(layout.attention_ranks), "shares": list(layout.shares),
                 "expert_owner": _plain(layout.expert_owner), "micro_batches": layout.micro_batches}
        self.files = ZebraFiles(self.opt, ctx.rank, split)
        self.module = parts.model
        self._eval: torch.nn.Module | None = None  # the gathered copy while evaluating

    def data_shares(self):
        return list(self.layout.shares), self.layout.share_index(self.ctx.rank)

    def lr(self) -> float | None:
        return self.opt.lr()

    def step(self, batches: Iterator[dict] | None, step: int) -> StepResult:
        t, att = self.recipe.training, self.layout.attention_ranks
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # global mean loss, aux loss, units
        bal, reports = self.stack.balance, self.ctx.rank == att[0]  # the aux loss is global: one rank reports it
        scale = self.stack.loss_scale = self.opt.loss_scale
        if bal is not None:
            bal.scale = scale
        for _ in range(t.grad_accum):
            if self.attending:
                batch = next(batches)
                _check_padding(batch, bal is not None)
                ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
                stats[0] += self.pipe.step(ids, labels) / scale / t.grad_accum
                stats[2] += self.parts.count(batch)
                if bal is not None and reports:
                    stats[0] += bal.coef * bal.value() / t.grad_accum
                    stats[1] += bal.value() / t.grad_accum
            else:
                self.pipe.step()
        self.opt.step(t.grad_accum, counted=self.counted)
        dist.all_reduce(stats)
        return StepResult(float(stats[0]), float(stats[1]) if bal is not None else math.nan, float(stats[2]))

    def row_metrics(self) -> tuple[float | None, dict, dict]:
        extra = {"zebra": True}
        if self.opt.scale is not None:
            extra.update(loss_scale=self.opt.loss_scale, skipped_steps=self.opt.skipped)
        return None, {}, extra

    def forward(self, batch: dict):
        return self._eval(**batch)

    def eval_module(self) -> torch.nn.Module:
        return self._eval  # this rank's module holds only its part

    def set_training(self, on: bool) -> None:
        """Evaluation (``on`` False, on every rank) runs on a whole copy gathered from the owners, freed after."""
        self.module.train(on)
        self._eval = None if on else full_copy(self.stack, self.layout, self.ctx.rank).eval()

    def save(self, step: int, state: dict) -> None:
        t = self.recipe.training
        save_checkpoint(self.files, self.recipe.checkpoint_dir, step, state, self.ctx, t.keep_checkpoints)

    def load(self) -> dict:
        check_same_world(self.recipe.checkpoint_dir, self.ctx.world_size)
        return load_checkpoint(self.files, self.recipe.checkpoint_dir, self.ctx)

    def export_state(self) -> dict | None:
        """The full model: dense tensors from the first attention rank, expert rows from their hosts."""
        return gather_state(self.stack, self.layout, self.ctx.rank)

    def memory(self) -> dict:
        """Parameter and optimizer bytes this rank holds."""
        read = None if self.read is None else len(self.read)
        return {"param_bytes": param_bytes(self.module), **self.opt.nbytes(), "checkpoint_entries_read": read}

    def header_lines(self) -> list[str]:
        lay = self.layout
        return [f"{self.recipe.name}: zebra, attention ranks {list(lay.attention_ranks)} (shares {list(lay.shares)}), "
                f"expert owners {_plain(lay.expert_owner)}, {lay.micro_batches} micro-batches ({self.info['source']})"]

    def summary_fields(self) -> dict:
        lay = self.layout
        per_rank: list = [None] * self.ctx.world_size
        dist.all_gather_object(per_rank, self.memory())  # collective: every rank builds the summary
        return {"zebra": {"attention_ranks": list(lay.attention_ranks), "shares": list(lay.shares),
                          "expert_owner": _plain(lay.expert_owner), "micro_batches": lay.micro_batches, "ran": True,
                          "memory_per_rank": per_rank, "skipped_steps": self.opt.skipped, **self.info}}

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

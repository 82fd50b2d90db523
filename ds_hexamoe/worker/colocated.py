"""The colocated step: a DeepSpeed engine (``ds_hexamoe.initialize``) on every rank, attention and experts
together, uneven batch shares when a heterogeneous plan runs (docs/design.md, "One training step")."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..hetero import global_token_count, loss_scale
from ..integrations.router_control import router_control
from ..integrations.transformers import global_balance
from ..recipes import Recipe, lr_lambda
from ..tasks.base import TaskParts, WorkerContext
from .checkpoints import load_checkpoint, save_checkpoint
from .metrics import ExpertLoadTracker, all_sum, runtime_metrics
from .strategy import StepResult
from .summary import run_report


class ColocatedStep:
    """:class:`~.strategy.StepStrategy` over a DeepSpeed engine; ``info``: why ``"zebra": "auto"`` left the
    run here (recorded in ``summary.json``), None when zebra was not asked for."""

    name = "colocated"
    keeps_checkpoints = True

    def __init__(self, recipe: Recipe, ctx: WorkerContext, accel: str, parts: TaskParts, info: dict | None = None):
        t = recipe.training
        self.recipe, self.ctx, self.parts, self.info = recipe, ctx, parts, info
        ds_config = recipe.ds_config(ctx.world_size, accel)
        # before DeepSpeed builds the optimizer: a frozen router must have no optimizer state
        self.router = router_control(parts.model, getattr(recipe.hexamoe_config, "router", None))
        scheduler = None if "scheduler" in ds_config else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)))
        self.engine, _, _, _ = _initialize_fn()(model=parts.model, config=ds_config, lr_scheduler=scheduler)
        self.runtime = getattr(self.engine, "hexamoe", None)
        # None: the engine's runtime reports balance itself
        self.tracker = (None if callable(getattr(self.runtime, "metrics", None))
                        else ExpertLoadTracker(self.engine.module, self.engine.device))
        self.hetero = getattr(self.runtime, "hetero", None)  # the heterogeneous controller, or None
        self.module, self.device = self.engine.module, self.engine.device

    def data_shares(self):
        return self.hetero, self.ctx.rank

    def lr(self) -> float | None:
        lrs = self.engine.get_lr()
        return float(lrs[0]) if lrs else None  # the rate this step applies (the scheduler moves after it)

    def step(self, batches: Iterator[dict], step: int) -> StepResult:
        step_loss, step_aux, units = self._micro_steps(batches)
        if self.router is not None:
            self.router.after_step()  # the aux-loss-free bias update (DeepSeek-V3), once per optimizer step
        if callable(getattr(self.runtime, "after_step", None)):
            self.runtime.after_step(step)
        loss, aux_loss, all_units = all_sum([step_loss, step_aux, float(units)], self.device)
        return StepResult(loss, aux_loss, all_units)

    def _micro_steps(self, batches: Iterator[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``grad_accum`` micro-steps; this rank's parts of the step's loss and aux loss (NaN without one): its
        loss times its share of each micro-batch's units, over ``grad_accum``, so the sum over ranks is the
        mean over micro-steps of each global micro-batch's loss, what one process computes."""
        ga, engine, world = self.recipe.training.grad_accum, self.engine, self.ctx.world_size
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        step_aux = torch.zeros((), dtype=torch.float64, device=self.device)
        units = 0
        for _ in range(ga):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            n_local = self.parts.count(batch)
            units += n_local
            # each rank's mean loss weighted by its share of the micro-batch's units, so DeepSpeed's equal
            # averaging over ranks gives the mean over the union, whatever the shares (1.0 when even)
            scale = loss_scale(n_local, global_token_count(n_local), world)
            out = engine(**batch)
            # the router's balancing loss over the global micro-batch (already inside the loss)
            loss, aux = global_balance(self.module, out, batch, scale / world)
            if self.router is not None:
                loss, _ = self.router.add_z_loss(loss, batch, scale / world)
            engine.backward(loss * scale)
            engine.step()
            share = scale / world / ga
            step_loss += loss.detach().to(torch.float64) * share
            step_aux += aux.detach().to(torch.float64) * share if aux is not None else math.nan
        return step_loss, step_aux, units

    def row_metrics(self) -> tuple[float | None, dict, dict]:
        rtm = runtime_metrics(self.engine)
        bal = rtm.get("balance") if self.tracker is None else self.tracker.balance()
        figures = self.router.figures() if self.router is not None else {}
        return bal, rtm, {"router": figures} if figures else {}

    def forward(self, batch: dict):
        return self.engine(**batch)

    def set_training(self, on: bool) -> None:
        self.engine.train() if on else self.engine.eval()

    def eval_module(self) -> torch.nn.Module:
        return self.module

    def save(self, step: int, state: dict) -> None:
        t = self.recipe.training
        save_checkpoint(self.engine, self.recipe.checkpoint_dir, step, state, self.ctx, t.keep_checkpoints,
                        adapters_only=self.recipe.peft is not None)

    def load(self) -> dict:
        return load_checkpoint(self.engine, self.recipe.checkpoint_dir, self.ctx,
                               adapters_only=self.recipe.peft is not None)

    def export_state(self) -> dict | None:
        export = getattr(self.runtime, "export_state_dict", None)
        return export() if callable(export) else None  # may be collective (FSSDP gathers experts)

    def header_lines(self) -> list[str]:
        return []

    def summary_fields(self) -> dict:
        return {} if self.info is None else {"zebra": {"ran": False, **self.info}}

    def report(self, metrics_path: str, train_s: float, steps: int, hf_dir: str | None) -> dict | None:
        return run_report(self.engine, self.ctx.world_size, metrics_path, train_s, steps, hf_dir)

    def close(self) -> None:
        if self.router is not None:
            self.router.close()


def _initialize_fn():
    try:
        from ..integrations.deepspeed import initialize
    except ModuleNotFoundError as e:
        if e.name != "ds_hexamoe.integrations.deepspeed":
            raise
        import deepspeed

        return deepspeed.initialize
    return initialize

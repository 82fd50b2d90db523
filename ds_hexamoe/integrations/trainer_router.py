"""``hexamoe.router`` in the Hugging Face Trainer and TRL's ``SFTTrainer``: what
:class:`~ds_hexamoe.integrations.trainer.HexaMoECallback` does with a :class:`RouterControl` (docs/recipes.md,
"Routers of a checkpoint"; docs/swin_trainer_megatron.md).

* the aux coefficient and ``freeze`` act when the callback is set up: ``Trainer(callbacks=[cb])`` (its
  ``on_init_end``) or ``cb.attach(trainer)``, both before ``train()`` builds the optimizer;
* the z-loss is added to what the Trainer's ``compute_loss`` returns (needs ``attach``), weighted so that
  the step's gradient gets ``z_loss_coef * mean(logsumexp^2)`` over each global micro-batch's router rows,
  averaged over the accumulation window, as in ``ds-hexamoe train``;
* the bias update runs once per optimizer step, loads summed over the window and all ranks.
"""
from __future__ import annotations

import torch

from ..config import ConfigError, HexaMoEConfig, RouterConfig
from .router_control import check_router_options, router_control

_WHERE = "hexamoe.router"


def parse_router(router) -> RouterConfig:
    """A :class:`RouterConfig` from a dict (keys of ``hexamoe.router``, checked like the section's) or itself."""
    if isinstance(router, RouterConfig):
        router.validate(_WHERE)
        return router
    if not isinstance(router, dict):
        raise ConfigError(f"router: got {type(router).__name__}; expected a dict of hexamoe.router keys or a "
                          "RouterConfig")
    return HexaMoEConfig.from_dict({"router": router}).router


def _router_params(routers) -> set[int]:
    return {id(p) for m in routers for p in m.parameters()}


class TrainerRouter:
    """A :class:`RouterControl` bound to a Trainer: z-loss through its ``compute_loss``, TRL's aux settings."""

    def __init__(self, model: torch.nn.Module, cfg: RouterConfig, optimizer=None, late: bool = False):
        """``optimizer``: one the Trainer was given; ``late``: ``train()`` has already built it (DeepSpeed's
        flat groups cannot be searched for router parameters, so ``freeze`` is refused outright)."""
        if cfg.freeze and (late or optimizer is not None):
            self._refuse_built_optimizer(model, cfg, optimizer, late)
        self.cfg = cfg
        self.control = router_control(model, cfg)  # freezes and sets the aux coefficient now
        self.trainer = None
        self._compute_loss = None

    @staticmethod
    def _refuse_built_optimizer(model, cfg, optimizer, late: bool) -> None:
        ids = _router_params([m for _, m, _ in check_router_options(model, cfg)])
        held = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"] if id(p) in ids]
        if held or late:
            raise ConfigError(f"{_WHERE}.freeze: the Trainer's optimizer already exists and holds the router "
                              "parameters; pass the callback as Trainer(callbacks=[HexaMoECallback(...)]) or call "
                              "HexaMoECallback(...).attach(trainer) before train(), or apply ds_hexamoe.integrations."
                              "router_control.router_control(model, RouterConfig(freeze=True)) before building "
                              "the optimizer")

    def bind(self, trainer) -> None:
        """Route the z-loss through ``trainer.compute_loss`` and align TRL's own aux-loss switch."""
        if self.trainer is trainer or self.control is None:
            return
        self.trainer = trainer
        coef = self.cfg.aux_loss_coef
        if coef is not None and hasattr(trainer, "aux_loss_enabled"):  # TRL adds its own coef * aux_loss
            trainer.aux_loss_enabled = coef > 0
            trainer.router_aux_loss_coef = coef
        if self.cfg.z_loss_coef > 0:
            self._compute_loss = trainer.compute_loss
            trainer.compute_loss = self._with_z_loss

    def check_bound(self) -> None:
        if self.control is not None and self.cfg.z_loss_coef > 0 and self.trainer is None:
            raise ConfigError(f"{_WHERE}.z_loss_coef: got {self.cfg.z_loss_coef}; the callback adds the z-loss "
                              "through the Trainer's compute_loss: call HexaMoECallback(...).attach(trainer) before "
                              "train(), or set z_loss_coef to 0")

    def share(self, num_items_in_batch) -> float:
        """The ``share`` of :meth:`RouterControl.add_z_loss` for the loss ``compute_loss`` returns: after it, the
        Trainer divides by the window's micro-steps unless the loss is already scaled for accumulation (the same
        rule as ``Trainer.training_step``), and DeepSpeed/DDP average over ranks."""
        t = self.trainer
        scaled = getattr(t, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((getattr(t, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                      or getattr(t, "compute_loss_func", None) is not None)
        world = max(1, int(t.accelerator.num_processes))
        steps = getattr(t, "current_gradient_accumulation_steps", None) or t.args.gradient_accumulation_steps
        return steps / world if scaled else 1.0 / world

    def _with_z_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        res = self._compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch,
                                 **kwargs)
        if not (model.training and torch.is_grad_enabled()):
            return res
        loss, out = res if return_outputs else (res, None)
        loss, _ = self.control.add_z_loss(loss, inputs, self.share(num_items_in_batch))
        return (loss, out) if return_outputs else loss

    def after_step(self) -> None:
        if self.control is not None:
            self.control.after_step()

    def log_figures(self, per_expert_max: int) -> dict[str, float]:
        """The per-layer figures since the previous call (collective) as flat ``router/...`` log keys."""
        figs = self.control.figures() if self.control is not None else {}
        out: dict[str, float] = {}
        for name, f in figs.get("layers", {}).items():
            for key in ("imbalance", "entropy", "aux_loss", "z_loss"):
                if f[key] is not None:
                    out[f"router/{key}/{name}"] = float(f[key])
            total = sum(f["tokens"])
            if total and len(f["tokens"]) <= per_expert_max:
                for e, v in enumerate(f["tokens"]):
                    out[f"router/load/{name}/e{e}"] = v / total
        if "z_loss" in figs:
            out["router/z_loss"] = float(figs["z_loss"])
        return out

    def close(self) -> None:
        if self._compute_loss is not None:
            self.trainer.compute_loss = self._compute_loss
            self._compute_loss = None
        if self.control is not None:
            self.control.close()

"""LoRA fine-tuning from a recipe's ``"peft"`` section (docs/recipes.md, "LoRA: the peft section"): the PEFT
config, the check of its targets against the model before launch, wrapping the base model before
``ds_hexamoe.initialize`` (only the adapters train, so the optimizer holds state for them alone), and the
adapter tensors the checkpoints and exports write.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..distributed import seed_all
from ..recipes import PeftSpec, Recipe

# layers PEFT's LoRA wraps by module (target_modules); fused expert weights go through target_parameters
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
_INIT = {"default": True, "gaussian": "gaussian"}  # the recipe's "init" -> PEFT's init_lora_weights


def lora_config(spec: PeftSpec):
    """The ``peft.LoraConfig`` of a recipe's ``"peft"`` section."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules) or None,
                      target_parameters=list(spec.target_parameters) or None,
                      modules_to_save=spec.modules_to_save, init_lora_weights=_INIT[spec.init])


def _matches(name: str, key: str) -> bool:
    # PEFT's rule for a list of names: the full name, or a suffix starting after a "."
    return name == key or name.endswith("." + key)


def target_problems(model: torch.nn.Module, spec: PeftSpec) -> list[str]:
    """Each ``"peft"`` target that names nothing (or nothing LoRA can wrap) in ``model``, as an error line."""
    modules = dict(model.named_modules())
    params = [f"{m}.{p}" if m else p for m, mod in modules.items() for p, _ in mod.named_parameters(recurse=False)]
    out = []
    for key in spec.target_modules:
        hits = [n for n in modules if _matches(n, key)]
        wrong = sorted({type(modules[n]).__name__ for n in hits if not isinstance(modules[n], _LORA_LAYERS)})
        if not hits:
            out.append(f"peft.target_modules: {key!r} matches no module of the model; give module names such as "
                       f"{_examples(modules, _LORA_LAYERS)}")
        elif wrong:
            out.append(f"peft.target_modules: {key!r} matches {wrong} modules, which LoRA cannot wrap by module; "
                       "name linear layers here, and fused expert weights in peft.target_parameters "
                       '(e.g. "mlp.experts.gate_up_proj")')
    for key in spec.target_parameters:
        if not any(_matches(n, key) for n in params):
            experts = sorted({n.split("layers.", 1)[-1].split(".", 1)[-1] for n in params if ".experts." in n})
            out.append(f"peft.target_parameters: {key!r} matches no parameter of the model; give parameter names "
                       f"such as {experts[:4] or sorted(params)[:4]}")
    for key in spec.modules_to_save or []:
        if not any(_matches(n, key) for n in modules):
            out.append(f"peft.modules_to_save: {key!r} matches no module of the model; give module names such as "
                       f"{_examples(modules, torch.nn.Module)}")
    return out


def _examples(modules: dict, kinds) -> list[str]:
    """A few distinct last-components of module names of ``kinds`` (what a target usually names)."""
    seen: list[str] = []
    for n, m in modules.items():
        leaf = n.rsplit(".", 1)[-1]
        if n and isinstance(m, kinds) and not leaf.isdigit() and leaf not in seen:
            seen.append(leaf)
    return seen[:6]


def check_peft_model(recipe: Recipe) -> None:
    """Before launch: the ``"peft"`` targets against the recipe's model built on the meta device (no weights
    read), and the sharding the adapters need. Every problem is raised at once."""
    from .causal_lm import build_model

    if recipe.peft is not None:
        _refuse_bad_targets(build_model(recipe, None, meta=True), recipe)


def _refuse_bad_targets(model: torch.nn.Module, recipe: Recipe) -> None:
    problems = target_problems(model, recipe.peft)
    if problems:
        raise ConfigError("\n".join(problems))


def apply_peft(model: torch.nn.Module, recipe: Recipe, log=print) -> torch.nn.Module:
    """``get_peft_model`` of the base ``model`` (before ``ds_hexamoe.initialize``): every base weight frozen, the
    adapters (and ``modules_to_save``) trainable; ``log`` gets one line with the counts."""
    from peft import get_peft_model

    spec = recipe.peft
    _refuse_bad_targets(model, recipe)
    seed_all(recipe.training.seed)  # the same initial adapters on every rank, whatever ran before
    wrapped = get_peft_model(model, lora_config(spec))
    trainable, total = parameter_counts(wrapped)
    log(f"[ds-hexamoe] LoRA r={spec.r}: {trainable:,} trainable parameters of {total:,} "
        f"({100.0 * trainable / max(1, total):.2f}%); the base weights are frozen")
    return wrapped


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter elements of ``model``."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The full adapter tensors of the PEFT ``model`` in PEFT's layout (``get_peft_model_state_dict``'s keys).

    With experts sharded by FSSDP each expert's factors live with its owner: they are gathered (a collective:
    every rank calls; rank 0 gets the tensors, the others ``{}``). Unsharded, PEFT's own function on every rank."""
    from ..fssdp import peft_adapter_state_dict

    return peft_adapter_state_dict(model)

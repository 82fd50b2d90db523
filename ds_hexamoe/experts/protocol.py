"""The experts protocol: how ds-hexamoe recognises, reads and annotates an MoE experts module.

An experts module is a transformers v5 ``@use_experts_implementation`` class (Mixtral, Qwen-MoE, OLMoE,
...) or one that exposes the same flags (:class:`ds_hexamoe.layers.HexaExperts`, the Megatron adapter):
``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated`` and ``has_post_expert_norm``, with 3-D
weights ``gate_up_proj``/``up_proj`` and ``down_proj``. Everything the package keeps about such a module
lives in one typed object, :class:`ExpertsState` (``state_of(module)``), never in loose attributes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.activations import activation_name

IMPLEMENTATION = "hexamoe"

# Flags set by @use_experts_implementation; older transformers v5 releases lack some (e.g. 5.17 has no
# has_post_expert_norm), so read them with transformers' own defaults.
_FLAG_DEFAULTS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                  "has_post_expert_norm": False}
_STATE_ATTR = "_hexamoe"


@dataclass
class ExpertsState:
    """ds-hexamoe's state on one experts module (telemetry and wiring, as module state).

    Attributes:
        name: qualified module name, the key of routing statistics (None: not named yet).
        last_counts: ``[E]`` tokens per expert of the last forward, on the routing's device.
        collector: the :class:`~ds_hexamoe.experts.collector.RoutingStatsCollector` recording this module.
        weights: FSSDP's provider ``weights(index) -> {"w1", "w2", "b1", "b2"}`` of materialized weights.
        fssdp_layer: FSSDP's ``ExpertLayer`` bookkeeping for this module.
        load_prefix: prefix of this module in the last ``load_state_dict`` (FSSDP's load hooks).
        runtime: the :class:`~ds_hexamoe.runtime.HexaMoERuntime` driving this module, if any.
        lora: PEFT's LoRA wrappers of the module and the adapters active now (:mod:`.lora`), if attached.
    """

    name: str | None = None
    last_counts: torch.Tensor | None = None
    collector: Any = None
    weights: Callable | None = None
    fssdp_layer: Any = None
    load_prefix: str = ""
    runtime: Any = None
    lora: Any = None


def state_of(module: torch.nn.Module) -> ExpertsState:
    """The module's :class:`ExpertsState`, created empty on first use."""
    st = module.__dict__.get(_STATE_ATTR)
    if st is None:
        st = ExpertsState()
        module.__dict__[_STATE_ATTR] = st
    return st


def flag(module, name: str) -> bool:
    """An experts flag of ``module`` with transformers' default when the class does not set it."""
    return getattr(module, name, _FLAG_DEFAULTS[name])


def is_experts_module(module: torch.nn.Module) -> bool:
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every experts module in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_experts_module(m)]


def uses_experts_interface(model: torch.nn.Module) -> bool:
    """True when some submodule is an experts module."""
    return any(is_experts_module(m) for m in model.modules())


def default_gate(module) -> bool:
    """True when the module's class keeps transformers' default gate (``act(g) * u``), not its own."""
    from transformers.integrations.moe import _default_apply_gate

    return getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate


def closed_form(module) -> tuple[str | None, str | None]:
    """``(activation name, None)`` when the module's expert MLP is the plain ``w2(act(w1 x))`` (gated or not)
    that code outside its own forward can recompute from the 3-D weights; ``(act, why not)`` otherwise."""
    act = activation_name(module.act_fn) if hasattr(module, "act_fn") else None
    why = None
    if act is None:
        why = f"activation {type(getattr(module, 'act_fn', None)).__name__} has no closed-form kernel"
    elif flag(module, "has_post_expert_norm"):
        why = "it applies a post-expert norm"
    elif flag(module, "has_gate") and not default_gate(module):
        why = f"{type(module).__name__} overrides the gate (_apply_gate)"
    elif getattr(module, "_is_expert_parallel", False):
        why = "transformers' own expert parallelism is on for it"
    return act, why


def weight_names(module) -> dict[str, str]:
    """``{"w1", "w2"[, "b1", "b2"]}`` -> attribute names of the module's 3-D expert tensors."""
    up = "gate_up_proj" if flag(module, "has_gate") else "up_proj"
    names = {"w1": up, "w2": "down_proj"}
    if flag(module, "has_bias"):
        names.update(b1=f"{up}_bias", b2="down_proj_bias")
    return names


def expert_weights(module, index=None) -> dict[str, torch.Tensor | None]:
    """The experts' 3-D weights in ``[E, in, out]`` orientation (views, no copies).

    An FSSDP-managed module supplies materialized weights through its state's ``weights(index)``."""
    provider = state_of(module).weights
    if provider is not None:
        raw = provider(index)
    else:
        names = weight_names(module)
        raw = {k: getattr(module, names[k], None) if k in names else None for k in ("w1", "w2", "b1", "b2")}
    if not flag(module, "is_transposed"):  # transformers stores [E, out, in]
        raw = dict(raw, w1=raw["w1"].transpose(1, 2), w2=raw["w2"].transpose(1, 2))
    return raw

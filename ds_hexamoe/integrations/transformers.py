"""Registers the ``"hexamoe"`` experts implementation with transformers v5.

``import ds_hexamoe`` calls :func:`register`, so ``from_pretrained(path, experts_implementation="hexamoe")``
runs every ``@use_experts_implementation`` model's experts through
:func:`ds_hexamoe.experts.hexamoe_experts_forward`. FP8-quantized experts (transformers' FP8 experts
interface) get :func:`ds_hexamoe.experts.fp8.hexamoe_fp8_experts_forward`: dequantized to bf16 on CUDA,
rejected before any work elsewhere.
"""
from __future__ import annotations

from .._import_hooks import when_imported
from ..experts import IMPLEMENTATION, hexamoe_experts_forward
from ..experts.fp8 import hexamoe_fp8_experts_forward


def _register_into(moe_module) -> None:
    moe_module.ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hexamoe_experts_forward)


def _register_fp8_into(fp8_module) -> None:
    # FP8-quantized checkpoints build their experts from a separate interface; without this entry a
    # "hexamoe" FP8 model fails at its first forward with transformers' KeyError
    fp8_module.ALL_FP8_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hexamoe_fp8_experts_forward)


def register() -> None:
    """Register ``"hexamoe"`` in transformers' experts interface as soon as transformers loads it."""
    when_imported("transformers.integrations.moe", _register_into)
    when_imported("transformers.integrations.finegrained_fp8", _register_fp8_into)

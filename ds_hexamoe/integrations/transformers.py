"""Registers the ``"hexamoe"`` experts implementation with transformers v5.

``import ds_hexamoe`` calls :func:`register`, so ``from_pretrained(path, experts_implementation="hexamoe")``
runs every ``@use_experts_implementation`` model's experts through
:func:`ds_hexamoe.experts.hexamoe_experts_forward`.
"""
from __future__ import annotations

from .._import_hooks import when_imported
from ..experts import IMPLEMENTATION, hexamoe_experts_forward


def _register_into(moe_module) -> None:
    moe_module.ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hexamoe_experts_forward)


def register() -> None:
    """Register ``"hexamoe"`` in transformers' experts interface as soon as transformers loads it."""
    when_imported("transformers.integrations.moe", _register_into)

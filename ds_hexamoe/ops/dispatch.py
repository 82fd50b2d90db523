"""Operator backend registry: which implementation of ESMM/ESTMM/ESS runs for a tensor.

``"torch"`` (this package's :mod:`~ds_hexamoe.ops.torch_ops`) serves CPU and is the reference;
``"triton"`` (``ds_hexamoe.kernels``) serves CUDA. ``HEXAMOE_KERNELS=torch|triton|auto`` or
:func:`set_backend` (driven by the ``"kernels"`` key of the ``"hexamoe"`` config) forces one. The choice is
made once per device type, at the first call, not per operator call.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")
_MODULES = {"torch": "ds_hexamoe.ops.torch_ops", "triton": "ds_hexamoe.kernels.triton_ops"}
_forced: str | None = None
# device type -> backend module, resolved on first use: no environment read or import per call
_chosen: dict[str, ModuleType] = {}


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (``None`` or ``"auto"`` restores device-based choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    _forced = None if name in (None, "auto") else name
    _chosen.clear()


def backend_name(device: torch.device) -> str:
    choice = _forced or os.environ.get("HEXAMOE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"HEXAMOE_KERNELS must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return choice


def triton_available() -> bool:
    try:
        importlib.import_module(_MODULES["triton"])
    except ImportError:
        return False
    return True


def get_backend(device: torch.device) -> ModuleType:
    """The module providing ``esmm``, ``estmm`` and ``ess`` for tensors on ``device``.

    Chosen once per device type (``HEXAMOE_KERNELS`` is read then); :func:`set_backend` re-chooses."""
    mod = _chosen.get(device.type)
    if mod is None:
        mod = _chosen[device.type] = importlib.import_module(_MODULES[backend_name(device)])
    return mod

"""Activations with closed-form derivatives, so expert backward never differentiates through autograd."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _silu_grad(h: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


def _gelu_grad(h: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return cdf + h * pdf


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(h, approximate="tanh")


def _gelu_tanh_grad(h: torch.Tensor) -> torch.Tensor:
    inner = _SQRT_2_OVER_PI * (h + 0.044715 * h.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)


def _relu_grad(h: torch.Tensor) -> torch.Tensor:
    return (h > 0).to(h.dtype)


# name -> (f, f'); names follow transformers' ACT2FN keys.
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "silu": (torch.nn.functional.silu, _silu_grad),
    "swish": (torch.nn.functional.silu, _silu_grad),
    "gelu": (torch.nn.functional.gelu, _gelu_grad),
    "gelu_pytorch_tanh": (_gelu_tanh, _gelu_tanh_grad),
    "gelu_new": (_gelu_tanh, _gelu_tanh_grad),
    "gelu_fast": (_gelu_tanh, _gelu_tanh_grad),
    "relu": (torch.relu, _relu_grad),
}


_aten = torch.ops.aten

# grad * f'(x) in one fused ATen kernel (the same closed forms as above, without the temporaries)
FUSED_BACKWARD: dict[str, Callable] = {
    "silu": lambda grad, x: _aten.silu_backward(grad, x),
    "swish": lambda grad, x: _aten.silu_backward(grad, x),
    "gelu": lambda grad, x: _aten.gelu_backward(grad, x, approximate="none"),
    "gelu_pytorch_tanh": lambda grad, x: _aten.gelu_backward(grad, x, approximate="tanh"),
    "gelu_new": lambda grad, x: _aten.gelu_backward(grad, x, approximate="tanh"),
    "gelu_fast": lambda grad, x: _aten.gelu_backward(grad, x, approximate="tanh"),
    "relu": lambda grad, x: _aten.threshold_backward(grad, x, 0),
}


def backward_fn(name: str) -> Callable:
    """``(grad, x) -> grad * f'(x)`` for activation ``name``."""
    if name in FUSED_BACKWARD:
        return FUSED_BACKWARD[name]
    _, dfn = get_activation(name)
    return lambda grad, x: grad * dfn(x)


def get_activation(name: str) -> tuple[Callable, Callable]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} has no closed-form derivative; choose one of {sorted(ACTIVATIONS)}") from None


def activation_name(act_fn) -> str | None:
    """Map a transformers activation module (``ACT2FN[...]``) or a function to a key of :data:`ACTIVATIONS`."""
    cls = type(act_fn).__name__
    by_class = {
        "SiLUActivation": "silu",
        "SiLU": "silu",
        "GELUActivation": "gelu",
        "GELU": "gelu",
        "PytorchGELUTanh": "gelu_pytorch_tanh",
        "GELUTanh": "gelu_pytorch_tanh",
        "NewGELUActivation": "gelu_new",
        "FastGELUActivation": "gelu_fast",
        "ReLU": "relu",
        "ReLUActivation": "relu",
    }
    if cls in by_class:
        if cls == "GELU" and getattr(act_fn, "approximate", "none") == "tanh":
            return "gelu_pytorch_tanh"
        if cls == "GELUActivation" and getattr(act_fn, "act", None) is not None:
            inner = act_fn.act
            if getattr(inner, "__name__", "") == "gelu" or inner is torch.nn.functional.gelu:
                return "gelu"
            return None
        return by_class[cls]
    for name, (fn, _) in ACTIVATIONS.items():
        if act_fn is fn:
            return name
    return None

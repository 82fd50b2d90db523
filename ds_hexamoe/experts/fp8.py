"""``experts_implementation="hexamoe"`` for transformers' FP8-quantized experts (``FP8Experts``).

On CUDA the block-scaled FP8 weights are dequantized to bf16 once per forward and run through the
expert-specific operators (:func:`ds_hexamoe.ops.expert_mlp`); the FP8 weights themselves are frozen, so
gradients flow to the hidden states and routing weights only. Elsewhere (CPU) an FP8 checkpoint is
rejected before any work, with the alternatives named: the kernels serve FP8 weights only on a GPU.
"""
from __future__ import annotations

import torch

from ..ops import build_expert_index, expert_mlp
from ..ops.activations import activation_name
from .protocol import flag

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def fp8_supported(device: torch.device) -> bool:
    """Where the FP8 experts path runs: CUDA devices."""
    return device.type == "cuda"


def reject_reason(module: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``module`` (an FP8 experts module) cannot run with ``"hexamoe"`` on ``device``; None when it can."""
    name = type(module).__name__
    if not fp8_supported(device):
        return (f"experts_implementation='hexamoe' got an FP8-quantized experts module ({name}) on {device}: "
                "the expert-specific kernels run FP8 weights only on a CUDA GPU. On this device load the checkpoint "
                "with experts_implementation='grouped_mm' (transformers' FP8 path), or dequantize it "
                "(FineGrainedFP8Config(dequantize=True)) to train with 'hexamoe'")
    w = module.gate_up_proj if flag(module, "has_gate") else module.up_proj
    if w.dtype not in FP8_DTYPES:
        return (f"experts_implementation='hexamoe' supports FP8 experts stored as {[str(d) for d in FP8_DTYPES]} "
                f"with block scales; {name} stores {w.dtype} (e.g. packed FP4): use experts_implementation='grouped_mm'")
    if getattr(module, "activation_scheme", "dynamic") == "static":
        return "experts_implementation='hexamoe' does not apply static FP8 activation scales; use 'grouped_mm'"
    custom_gate = any(getattr(module, a, None) is not None for a in ("gate_softcap", "swiglu_alpha", "limit"))
    if flag(module, "has_bias") or custom_gate or activation_name(module.act_fn) is None:
        return (f"experts_implementation='hexamoe' runs FP8 experts with transformers' default gate, a known "
                f"activation and no biases; {name} has a softcapped/clamped gate, biases or another activation: "
                "use experts_implementation='grouped_mm'")
    return None


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``w[E, out, in]`` (FP8) times its block scales ``scale_inv[E, ceil(out/bo), ceil(in/bi)]``, in ``dtype``.

    The block shape follows from the two shapes (a scale dimension of 1 scales the whole row/column)."""
    E, n_out, n_in = w.shape
    s_out, s_in = scale_inv.shape[1], scale_inv.shape[2]
    bo, bi = -(-n_out // s_out), -(-n_in // s_in)
    s = scale_inv.float().repeat_interleave(bo, 1)[:, :n_out].repeat_interleave(bi, 2)[:, :, :n_in]
    return (w.float() * s).to(dtype)


def hexamoe_fp8_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' FP8 experts forward on the expert-specific operators (CUDA), or a clear error first."""
    reason = reject_reason(self, hidden_states.device)
    if reason is not None:
        raise ValueError(reason)
    gated = flag(self, "has_gate")
    up = "gate_up_proj" if gated else "up_proj"
    dtype = hidden_states.dtype if hidden_states.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    w1 = dequantize(getattr(self, up), getattr(self, f"{up}_scale_inv"), dtype).detach()
    w2 = dequantize(self.down_proj, self.down_proj_scale_inv, dtype).detach()
    index = build_expert_index(top_k_index, w1.size(0))
    row_scale = top_k_weights.reshape(-1)
    if getattr(self, "_is_expert_parallel", False):
        row_scale = row_scale.masked_fill(top_k_index.reshape(-1) >= w1.size(0), 0.0)
    out = expert_mlp(hidden_states.to(dtype), w1.transpose(1, 2), w2.transpose(1, 2), index,
                     act=activation_name(self.act_fn), gated=gated, interleaved=not flag(self, "is_concatenated"),
                     row_scale=row_scale.to(dtype))
    return out.to(hidden_states.dtype)

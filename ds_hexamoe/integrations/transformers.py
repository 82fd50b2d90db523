"""Registers the ``"hexamoe"`` experts implementation with transformers v5.

``import ds_hexamoe`` calls :func:`register`, so ``from_pretrained(path, experts_implementation="hexamoe")``
runs every ``@use_experts_implementation`` model's experts through
:func:`ds_hexamoe.experts.hexamoe_experts_forward`. FP8-quantized experts (transformers' FP8 experts
interface) get :func:`ds_hexamoe.experts.fp8.hexamoe_fp8_experts_forward`: dequantized to bf16 on CUDA,
rejected before any work elsewhere. :func:`global_balance` makes a transformers MoE model's router
auxiliary loss a global-batch quantity for the colocated step.
"""
from __future__ import annotations

import logging

import torch

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


def global_balance(model, out, batch: dict, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, aux_loss)`` of ``model(**batch)``'s output ``out``, the router's balancing loss over the global
    batch (:mod:`ds_hexamoe.layers.balance`): with ``share`` the weight the caller gives this rank (its units
    over all ranks'), the weighted sum over ranks is one process's aux loss.

    A transformers MoE model (``output_router_logits``) adds ``router_aux_loss_coef * aux`` computed on this
    rank's tokens alone; that part is recomputed with the expert fractions of all ranks (one all-reduce, on
    every rank alike). Other outputs (the package's own router reduces in its forward) pass unchanged."""
    from ..layers.balance import balance_loss, pooled_router_sums  # not at import: ds_hexamoe loads no model code

    aux, logits = getattr(out, "aux_loss", None), getattr(out, "router_logits", None)
    cfg = getattr(model, "config", None)
    coef, top_k = getattr(cfg, "router_aux_loss_coef", None), getattr(cfg, "num_experts_per_tok", None)
    if (out.loss is None or not torch.is_tensor(aux) or not isinstance(logits, tuple) or not logits
            or coef is None or top_k is None):
        return out.loss, aux if torch.is_tensor(aux) else None
    counts, probs, rows = pooled_router_sums(logits, int(top_k), batch.get("attention_mask"))
    ours = balance_loss(counts, rows, probs, rows, share)  # collective: before any rank may return early
    own = counts.numel() * (counts / rows.clamp_min(1.0) * probs / rows.clamp_min(1.0)).sum()
    if not torch.allclose(own.detach().float(), aux.detach().float(), rtol=1e-3, atol=1e-6):
        _warn_once(type(model).__name__, float(aux), float(own))
        return out.loss, aux
    return out.loss + coef * (ours - aux).to(out.loss.dtype), ours


_WARNED: set[str] = set()


def _warn_once(name: str, theirs: float, ours: float) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        logging.getLogger(__name__).warning(
            "%s: its router auxiliary loss (%.6g) is not transformers' load_balancing_loss_func (%.6g); it stays "
            "computed on each rank's own tokens, so the logged loss depends on the batch split", name, theirs, ours)

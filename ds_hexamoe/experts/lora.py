"""LoRA on experts, expert-specific: ``y = x W_e + scale * (x A_e) B_e`` through the re-index vector.

PEFT (0.21) puts LoRA on fused 3-D expert tensors with ``target_parameters``: a ``ParamWrapper`` around
the experts module registers, for each forward, a parametrization that materializes ``W + scale * A B``
for every expert. :func:`attach_lora` keeps PEFT from doing that for modules running the ``"hexamoe"``
forward: each wrapper's ``_activate_lora`` only notes, on the module's :class:`ExpertsState`, which
adapter is active; the forward then adds the low-rank path with two more ESMMs of rank ``r``
(:func:`lora_linear`), whose adapter gradients are ESTMMs, and a frozen ``W`` gets no gradient.
PEFT's ``disable_adapter()``, merged adapters, the active adapter and its ``scaling`` keep their meaning
because the wrapper's own ``forward`` still decides whether ``_activate_lora`` runs.

PEFT's layouts (``ParamWrapper.get_delta_factors``), with ``in``/``out`` the expert linear's true input
and output: ``lora_A.weight`` is ``[r*E, in]`` (rows expert-major), ``lora_B.weight`` is ``[out, r*E]``
(columns expert-minor). :func:`factors_from_peft` gives them as ``A[E, in, r]``, ``B[E, r, out]`` views,
the orientation :func:`~ds_hexamoe.experts.expert_weights` returns weights in (docs/fssdp.md, "LoRA on
experts (PEFT)").
"""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, field

import torch

from ..ops import expert_linear
from .protocol import IMPLEMENTATION, is_experts_module, state_of, weight_names

# provider keys of the adapter factors of a weight key, as FSSDP shards them beside the weights
LORA_KEYS = {"w1": ("w1_lora_a", "w1_lora_b"), "w2": ("w2_lora_a", "w2_lora_b")}


@dataclass
class LoraFactors:
    """The active adapter of one expert weight: ``A[E, in, r]``, ``B[E, r, out]`` and PEFT's ``scaling``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass
class LoraBinding:
    """PEFT's wrappers of one experts module (``{weight key: ParamWrapper}``) and, during a forward, the
    adapter each has active (``{weight key: adapter name}``, set by the wrapper's ``_activate_lora``)."""

    wrappers: dict = field(default_factory=dict)
    active: dict = field(default_factory=dict)


def _param_wrapper_cls():
    if "peft" not in sys.modules:  # a model carrying PEFT's wrappers was built with PEFT imported: don't import it
        return None
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def _runs_hexamoe(module) -> bool:
    impl = getattr(getattr(module, "config", None), "_experts_implementation", IMPLEMENTATION)
    return impl == IMPLEMENTATION


def attach_lora(model: torch.nn.Module) -> list[str]:
    """Route PEFT's LoRA on the experts of ``model`` through the expert-specific path (idempotent).

    Every PEFT ``ParamWrapper`` whose base layer is an experts module running ``"hexamoe"`` stops registering
    its parametrization; the forward computes the adapter's contribution with ESMMs instead. Returns
    ``"<module>.<parameter>"`` of each wrapper attached. Raises ValueError for a wrapper on a bias."""
    cls = _param_wrapper_cls()
    if cls is None:
        return []
    names = {m: n for n, m in model.named_modules()}
    done = []
    for wrapper in model.modules():
        if not isinstance(wrapper, cls):
            continue
        base = wrapper.get_base_layer()
        if not is_experts_module(base) or not _runs_hexamoe(base):
            continue  # PEFT's own path stays right for any other implementation
        keys = {v: k for k, v in weight_names(base).items()}
        key = keys.get(wrapper.parameter_name)
        if key not in LORA_KEYS:
            raise ValueError(f"LoRA target_parameters: {names.get(base, '?')}.{wrapper.parameter_name} is not an "
                             f"expert weight ({', '.join(weight_names(base)[k] for k in LORA_KEYS)}); target those")
        st = state_of(base)
        if st.lora is None:
            st.lora = LoraBinding()
        st.lora.wrappers[key] = wrapper
        wrapper._activate_lora = types.MethodType(_note_active(key, base), wrapper)
        done.append(f"{names.get(base, '?')}.{wrapper.parameter_name}")
    return done


def has_lora(module) -> bool:
    """True when PEFT LoRA wrappers of ``module`` were attached (:func:`attach_lora`)."""
    binding = state_of(module).lora
    return binding is not None and bool(binding.wrappers)


def _note_active(key: str, module):
    @contextlib.contextmanager
    def activate(wrapper, active_adapters):
        adapters = [a for a in (active_adapters or []) if a in wrapper.lora_A]
        if not adapters:
            yield
            return
        if len(adapters) > 1:
            raise ValueError(f"LoRA on experts ({wrapper.parameter_name}): {len(adapters)} adapters active at once "
                             f"({adapters}); the expert-specific path runs one; call set_adapter(name) with one")
        binding = state_of(module).lora
        binding.active[key] = adapters[0]
        try:
            yield
        finally:
            binding.active.pop(key, None)
    return activate


def factors_from_peft(wrapper, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A``/``lora_B`` weights of ``adapter`` as ``A[E, in, r]``, ``B[E, r, out]`` views."""
    e = wrapper.num_experts
    wa, wb = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    a = wa.view(e, -1, wa.size(-1)).transpose(1, 2)  # rows expert-major: [E, r, in]
    b = wb.view(wb.size(0), -1, e).permute(2, 1, 0)  # columns expert-minor: [out, r, E]
    return a, b


def factors_to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`factors_from_peft`: ``(lora_A.weight [r*E, in], lora_B.weight [out, r*E])``."""
    e, r = a.size(0), a.size(2)
    return a.transpose(1, 2).reshape(e * r, a.size(1)), b.permute(2, 1, 0).reshape(b.size(2), r * e)


def active_lora(module, weights: dict) -> dict[str, LoraFactors]:
    """``{weight key: LoraFactors}`` of the adapters active in this forward; factors from ``weights`` (FSSDP's
    materialized ones) when it holds them, else PEFT's own parameters."""
    binding = state_of(module).lora
    if binding is None or not binding.active:
        return {}
    out = {}
    for key, adapter in binding.active.items():
        wrapper = binding.wrappers[key]
        ka, kb = LORA_KEYS[key]
        if weights.get(ka) is not None:
            a, b = weights[ka], weights[kb]
        else:
            a, b = factors_from_peft(wrapper, adapter)
        dtype = weights[key].dtype
        out[key] = LoraFactors(a=a.to(dtype), b=b.to(dtype), scale=wrapper.scaling[adapter])
    return out


def lora_linear(x, w, index, lora: LoraFactors | None, *, gather_div=None, scatter=False, bias=None,
                row_scale=None) -> torch.Tensor:
    """:func:`~ds_hexamoe.ops.expert_linear` plus ``scale * (x A_e) B_e``: two rank-``r`` ESMMs through the same
    re-index vector (the first reads ``x`` as the base product does, the second writes as it does)."""
    y = expert_linear(x, w, index, gather_div=gather_div, scatter=scatter, bias=bias, row_scale=row_scale)
    if lora is None:
        return y
    t = expert_linear(x, lora.a, index, gather_div=gather_div)  # [P, r], expert order
    # PEFT's B view has the expert axis innermost, which grouped matmuls reject; B is tiny, so copy it
    u = expert_linear(t, lora.b.contiguous(), index, scatter=scatter, row_scale=row_scale)
    return y + u * lora.scale


def lora_mlp(x, w1, w2, index, lora: dict, activate, *, b1=None, b2=None, row_scale=None) -> torch.Tensor:
    """Token-order ``x[T, d]`` through the expert MLP with adapters (``{weight key: LoraFactors}``, possibly
    empty): :func:`lora_linear` for both linears, ``activate(h)`` between (autograd), fp32 sum over the choices."""
    h = lora_linear(x, w1, index, lora.get("w1"), gather_div=index.k, bias=b1)
    y = lora_linear(activate(h), w2, index, lora.get("w2"), scatter=True, bias=b2, row_scale=row_scale)
    return y.view(-1, index.k, y.size(-1)).sum(1, dtype=torch.float32).to(x.dtype)

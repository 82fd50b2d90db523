"""LoRA adapters on FSSDP experts: each expert's factors ``A_e``, ``B_e`` live with the expert (docs/fssdp.md,
"LoRA on experts (PEFT)").

At sharding, an experts module with PEFT LoRA wrappers attached (:func:`ds_hexamoe.experts.attach_lora`) gets
its adapter factors as four more per-expert tensors of its :class:`~.layer.ExpertLayer` (``A[E, in, r]``,
``B[E, r, out]`` per targeted weight), so the owner holds them, gathers move them with the expert, their
gradients are reduced to the owner, re-ownership and checkpoints carry them like any shard. PEFT's own
``lora_A``/``lora_B`` weights of the experts are left as empty frozen placeholders (the shards replace them);
:func:`peft_adapter_state_dict` gives the full adapter back in PEFT's layout and keys.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_save_dir
from ..config import ConfigError
from ..experts import factors_from_peft, factors_to_peft, state_of
from ..experts.lora import LORA_KEYS


def _adapter_of(name: str, wrapper) -> str:
    adapters = list(wrapper.lora_A.keys())
    if len(adapters) != 1:
        raise ConfigError(f"hexamoe.sharding: experts module {name!r} carries {len(adapters)} LoRA adapters "
                          f"({adapters}) on {wrapper.parameter_name}; FSSDP shards one adapter: delete the others "
                          "(model.delete_adapter(name)) before ds_hexamoe.initialize")
    return adapters[0]


def adapter_tensors(name: str, module: nn.Module, names: dict[str, str]) -> dict[str, nn.Parameter]:
    """``{provider key: full [E, ...] factor}`` of the LoRA adapter on ``module`` (empty without one); adds the
    shard parameter names to ``names`` (``{key: parameter name}``). Checks before anything changes."""
    binding = state_of(module).lora
    out = {}
    for key, wrapper in (binding.wrappers.items() if binding is not None else ()):
        adapter = _adapter_of(name, wrapper)
        a, b = factors_from_peft(wrapper, adapter)
        trainable = wrapper.lora_A[adapter].weight.requires_grad
        for k, t, suffix in zip(LORA_KEYS[key], (a, b), ("lora_A", "lora_B")):
            names[k] = f"{names[key]}_{suffix}"
            out[k] = nn.Parameter(t.detach().contiguous(), requires_grad=trainable)
    return out


def release_peft_factors(module: nn.Module) -> None:
    """Replace PEFT's full expert factors by empty frozen placeholders (the shards hold them now)."""
    binding = state_of(module).lora
    for wrapper in (binding.wrappers.values() if binding is not None else ()):
        for d in (wrapper.lora_A, wrapper.lora_B):
            for lin in d.values():
                lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)


def fill_peft_keys(mgr, layer, full: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Write a layer's gathered full factors ``{shard name: [E, ...]}`` into ``out`` under the model's own
    keys of PEFT's placeholders, in PEFT's layout (``lora_A.weight [r*E, in]``, ``lora_B.weight [out, r*E]``)."""
    binding = state_of(layer.module).lora
    keys = {id(p): n for n, p in mgr.model.named_parameters(remove_duplicate=False)}
    for key, wrapper in binding.wrappers.items():
        adapter = next(iter(wrapper.lora_A.keys()))
        ka, kb = (layer.names[k] for k in LORA_KEYS[key])
        wa, wb = factors_to_peft(full[ka], full[kb])
        out[keys[id(wrapper.lora_A[adapter].weight)]] = wa
        out[keys[id(wrapper.lora_B[adapter].weight)]] = wb


def peft_adapter_state_dict(model: nn.Module, manager=None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``peft.get_peft_model_state_dict(model)`` with the experts' adapters gathered from their owners: the same
    keys and layouts, so ``adapter_model.safetensors`` written from it loads with ``PeftModel.from_pretrained``.

    A collective when ``model`` is FSSDP-sharded (every rank calls it; rank 0 gets the tensors, other ranks
    ``{}``); ``manager``: its :class:`~.manager.FSSDPManager` (default: the one ``ds_hexamoe.initialize``
    attached, ``engine.hexamoe.fssdp``). Without FSSDP, PEFT's own function on every rank."""
    from peft import get_peft_model_state_dict

    mgr = manager if manager is not None else _manager_of(model)
    if mgr is None:
        return get_peft_model_state_dict(model, adapter_name=adapter_name)
    full = mgr.full_state_dict(rank0_only=True)
    if dist.get_rank(mgr.group) != 0:
        return {}
    return get_peft_model_state_dict(model, state_dict=full, adapter_name=adapter_name)


def save_peft_adapter(model: nn.Module, directory: str, manager=None, adapter_name: str = "default") -> bool:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` of ``adapter_name`` into ``directory``
    (replaced whole, atomically), as ``PeftModel.save_pretrained`` does for an unsharded model, so
    ``PeftModel.from_pretrained(base, directory)`` loads it. A collective under FSSDP (every rank calls it);
    rank 0 writes. Returns True on the rank that wrote."""
    from safetensors.torch import save_file

    sd = peft_adapter_state_dict(model, manager=manager, adapter_name=adapter_name)
    mgr = manager if manager is not None else _manager_of(model)
    group = mgr.group if mgr is not None else None
    if dist.is_initialized() and dist.get_rank(group) != 0:
        return False

    def write(tmp: str) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config[adapter_name].save_pretrained(tmp)

    atomic_save_dir(write, directory)
    return True


def _manager_of(model: nn.Module):
    """The FSSDP manager of a sharded ``model`` (through the runtime ``ds_hexamoe.initialize`` attached); None
    when no experts module is sharded."""
    from ..experts import experts_modules

    for name, m in experts_modules(model):
        st = state_of(m)
        if st.fssdp_layer is None:
            continue
        mgr = getattr(st.runtime, "fssdp", None)
        if mgr is None:
            raise ValueError(f"peft_adapter_state_dict: experts module {name!r} is FSSDP-sharded but no manager is "
                             "known; pass manager=engine.hexamoe.fssdp (or the FSSDPManager that sharded it)")
        return mgr
    return None

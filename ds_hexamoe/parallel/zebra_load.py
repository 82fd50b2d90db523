"""One zebra rank reads only its own tensors from a saved Hugging Face checkpoint (docs/modes.md, "Zebra",
memory): the model is built on the meta device, :func:`~.zebra_parts.keep_part` says what the rank keeps, and
:func:`read_part` reads from the safetensors files only the entries that fill those tensors.

transformers v5 saves MoE weights in the legacy layout under other names (``block_sparse_moe.experts.3.w1.weight``
and ``...w3.weight`` fill rows of ``mlp.experts.gate_up_proj[3]``). Which entry fills which rows is asked of
transformers itself: its own save-time conversion (``revert_weight_conversion``) is applied to a probe tensor
of the parameter's shape with its last dimension cut to 1 and holding each row's flat index, so every entry
it produces names the rows it holds. An entry must hold whole, consecutive rows (what the families in
docs/supported_models.md save); anything else is refused naming the tensor, before any weight is read.
"""
from __future__ import annotations

import json
import os

import torch


def checkpoint_files(path: str) -> dict[str, str]:
    """``{entry: safetensors file}`` of the checkpoint folder ``path`` (sharded or not)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            return {k: os.path.join(path, f) for k, f in json.load(fh)["weight_map"].items()}
    from safetensors import safe_open

    single = os.path.join(path, "model.safetensors")
    with safe_open(single, "pt") as fh:
        return {k: single for k in fh.keys()}


def _entries(model, name: str, shape: torch.Size) -> dict[str, tuple[int, int]]:
    """``{entry: (first row, rows)}`` in ``name``'s rows (all dimensions but the last, flattened)."""
    from transformers.core_model_loading import revert_weight_conversion

    rows = int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1
    probe = torch.arange(rows, dtype=torch.float64).reshape(*shape[:-1], 1) if len(shape) > 1 else torch.zeros(1)
    out = {}
    for key, t in revert_weight_conversion(model, {name: probe}).items():
        got = t.reshape(-1).long()
        if got.numel() and not torch.equal(got, torch.arange(int(got[0]), int(got[0]) + got.numel())):
            raise ValueError(f"zebra: {name} is saved as {key} with rows out of order; it cannot be read in part "
                             "(load the whole model)")
        out[key] = (int(got[0]) if got.numel() else 0, got.numel())
    return out


def read_part(stack, layout, rank: int, path: str) -> list[str]:
    """Fill what ``rank`` keeps of ``stack.model`` (built on the meta device, then cut by
    :func:`~.zebra_parts.keep_part`) from the checkpoint at ``path``, reading only the entries that hold it;
    meta buffers are read where saved, else rebuilt from the config (rotary frequencies). Returns the
    entries read."""
    from .zebra_parts import expert_layers, replace_parameters

    model, files, read, swap = stack.model, checkpoint_files(path), [], {}
    layer_of = expert_layers(stack)
    attending = rank in layout.attention_ranks
    for name, p in model.named_parameters():
        layer = layer_of.get(id(p))
        rows = None if layer is None else stack.rows[layer]
        if (not attending if layer is None else not rows):
            continue  # not this rank's: a dense tensor off the attention ranks, a layer it hosts no expert of
        full = (stack.c.experts, *p.shape[1:]) if layer is not None else p.shape
        value = _read(model, name, p, torch.Size(full), rows, files, read)
        swap[id(p)] = torch.nn.Parameter(value, requires_grad=p.requires_grad)
    replace_parameters(model, swap)
    for name, b in list(model.named_buffers()):
        if b.device.type == "meta" and all(k in files for k in _entries(model, name, b.shape)):
            mod, _, leaf = name.rpartition(".")
            model.get_submodule(mod)._buffers[leaf] = _read(model, name, b, b.shape, None, files, read)
    _rebuild_buffers(model)
    return read


def _read(model, name: str, like: torch.Tensor, full: torch.Size, rows: dict | None, files: dict, read: list):
    """``name``'s tensor (``like``'s shape and dtype; ``rows``: expert -> row of a compact experts tensor)."""
    from safetensors import safe_open

    per_expert = int(torch.tensor(full[1:-1]).prod()) if rows is not None else 0
    value = torch.empty(like.shape, dtype=like.dtype)
    flat = value.reshape(-1, like.shape[-1]) if like.dim() > 1 else value.reshape(1, -1)
    for key, (first, n) in _entries(model, name, full).items():
        if rows is not None:
            e = first // per_expert
            if e not in rows:
                continue  # another rank's expert: never read
            first = rows[e] * per_expert + first % per_expert
        if key not in files:
            raise ValueError(f"zebra: {name} needs {key!r}, which the checkpoint does not hold")
        with safe_open(files[key], "pt") as fh:
            shape = fh.get_slice(key).get_shape()
            if shape[-1] != flat.size(1) or int(torch.tensor(shape).prod()) != n * flat.size(1):
                raise ValueError(f"zebra: {key} {list(shape)} does not fill {n} rows of {name} {list(full)}; it "
                                 "cannot be read in part (load the whole model)")
            flat[first:first + n] = fh.get_tensor(key).reshape(n, -1).to(like.dtype)
        read.append(key)
    return value


def _rebuild_buffers(model) -> None:
    """Buffers still on the meta device (not saved: rotary frequencies) from a fresh module of the same class."""
    for mod in model.modules():
        if any(b is not None and b.device.type == "meta" for b in mod._buffers.values()):
            fresh = type(mod)(config=model.config)
            for n, b in fresh._buffers.items():
                if mod._buffers.get(n) is not None and mod._buffers[n].device.type == "meta":
                    mod._buffers[n] = b

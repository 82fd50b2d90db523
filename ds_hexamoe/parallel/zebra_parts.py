"""What one zebra rank keeps of the model, and the whole model gathered back (docs/modes.md, "Zebra", memory).

After the split is known each rank drops what it does not own: an attention rank keeps the dense part
(embedding, attention, norms, routers, shared experts, dense layers, head), an expert rank no dense tensor;
every rank keeps, per MoE layer, only the rows of the experts it hosts in that layer (a compact
``[n_hosted, ...]`` tensor per experts weight; with Asym-EA's per-layer owners an attention rank hosts some
too, and the count differs per layer). Dropped tensors (and a layer's experts where the rank hosts none)
stay as meta tensors of their shape and dtype (no storage), so the module tree, names and shapes remain
those of the Hugging Face model. :func:`gather_state` rebuilds the full state dict on every rank from the
owners (one all-reduce per tensor, zeros elsewhere: exact).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def replace_parameters(model: torch.nn.Module, swap: dict[int, torch.nn.Parameter]) -> None:
    """Every module slot holding a parameter in ``swap`` (by id) gets its replacement (ties stay tied)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in swap:
                module._parameters[name] = swap[id(p)]


def _meta(p: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)


def keep_part(stack, layout, rank: int) -> None:
    """Drop from ``stack`` (an :class:`~.zebra_hf.HFZebraStack`) what ``rank`` does not own under ``layout``;
    ``stack.rows[l]``: expert -> row of the rank's compact experts tensors of MoE layer ``l``."""
    swap, rows = {}, []
    if rank not in layout.attention_ranks:
        swap = {id(p): _meta(p) for p in stack.dense_parameters()}
    for layer in range(stack.c.layers):
        hosted = layout.hosted(rank, layer)
        for p in stack.layer_expert_parameters(layer):
            swap[id(p)] = (torch.nn.Parameter(p.detach()[hosted].clone(), requires_grad=p.requires_grad)
                           if hosted else _meta(p))
        rows.append({e: i for i, e in enumerate(hosted)})
    replace_parameters(stack.model, swap)
    stack.rows = rows


def init_part(stack, layout, rank: int, seed: int) -> None:
    """Initialize what ``rank`` keeps of a fresh ``stack.model`` (built on the meta device, then cut by
    :func:`keep_part`) with the values the whole model would get (:func:`~ds_hexamoe.models.meta_init.materialize`):
    the dense part on an attention rank, each layer's experts tensor built whole then cut to the hosted rows;
    nothing else is allocated."""
    from ..models.meta_init import materialize

    layer_of, attending = expert_layers(stack), rank in layout.attention_ranks

    def want(name: str, p: torch.nn.Parameter):
        layer = layer_of.get(id(p))
        if layer is None:
            return (p.shape, None) if attending else None
        rows = stack.rows[layer]
        return ((stack.c.experts, *p.shape[1:]), sorted(rows, key=rows.get)) if rows else None

    materialize(stack.model, seed, want)


def expert_layers(stack) -> dict[int, int]:
    """``{id(parameter): MoE layer}`` of ``stack``'s experts weights."""
    return {id(p): layer for layer in range(stack.c.layers) for p in stack.layer_expert_parameters(layer)}


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (meta tensors hold none; tied tensors count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p.device.type != "meta":
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def gather_state(stack, layout, rank: int) -> dict:
    """The full state dict on every rank, on the host: dense tensors from the first attention rank, expert rows
    from their hosts (collective, one tensor at a time on the pipeline's device; the same call order on every
    rank)."""
    from .zebra_wire import stack_device

    layer_of, device = expert_layers(stack), stack_device(stack)[0]
    gathered = {}
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            layer = layer_of.get(id(p))
            shape = (stack.c.experts, *p.shape[1:]) if layer is not None else p.shape
            mine = torch.zeros(shape, dtype=p.dtype, device=device)
            hosted = [] if layer is None else layout.hosted(rank, layer)
            if hosted:
                mine[hosted] = p if stack.rows is not None else p[hosted]
            elif layer is None and rank == layout.attention_ranks[0]:
                mine.copy_(p)
            dist.all_reduce(mine)
            gathered[name] = mine.cpu()
    # the rest (buffers, a tied head): this rank's own, on the host (meta where it holds none)
    return {k: gathered[k] if k in gathered else v if v.device.type == "meta" else v.cpu()
            for k, v in stack.model.state_dict().items()}


def full_copy(stack, layout, rank: int) -> torch.nn.Module:
    """A whole copy of ``stack.model`` gathered from the owners (collective), without gradients, on the
    pipeline's device: what evaluation runs on every rank with transformers' own forward."""
    import copy

    from .zebra_wire import stack_device

    state, device = gather_state(stack, layout, rank), stack_device(stack)[0]
    model = copy.deepcopy(stack.model)  # meta tensors copy as meta: no storage until replaced
    replace_parameters(model, {id(p): torch.nn.Parameter(state[n].to(device), requires_grad=False)
                               for n, p in model.named_parameters()})
    return model


def move_part(model: torch.nn.Module, device: torch.device) -> None:
    """What this rank holds of ``model`` (parameters and buffers not on the meta device) onto ``device``."""
    swap = {id(p): torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            for p in model.parameters() if p.device.type != "meta" and p.device != device}
    replace_parameters(model, swap)
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(device)


def owned_bytes(stack, layout, rank: int) -> int:
    """Parameter bytes ``rank`` owns under ``layout`` (what :func:`keep_part` leaves it), for any zebra stack:
    the dense part on an attention rank, plus its hosted share of the (equal-sized) experts of each layer."""
    def size(ps):
        return sum(p.numel() * p.element_size() for p in ps)

    c = stack.c
    hosted = sum(len(layout.hosted(rank, layer)) for layer in range(c.layers))
    dense = size(stack.dense_parameters()) if rank in layout.attention_ranks else 0
    return dense + size(stack.expert_parameters()) * hosted // (c.experts * c.layers)

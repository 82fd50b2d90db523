"""What one zebra rank keeps of the model, and the whole model gathered back (docs/modes.md, "Zebra", memory).

After the split is known each rank drops what it does not own: an attention rank keeps the dense part
(embedding, attention, norms, routers, shared experts, dense layers, head) and no routed expert; an expert
rank keeps only the rows of its hosted experts (a compact ``[n_hosted, ...]`` tensor per experts weight) and
no dense tensor. Dropped tensors stay as meta tensors of their shape and dtype (no storage), so the module
tree, names and shapes remain those of the Hugging Face model. :func:`gather_state` rebuilds the full
state dict on every rank from the owners (one all-reduce per tensor, zeros elsewhere: exact).
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


def keep_part(stack, layout, rank: int) -> None:
    """Drop from ``stack`` (an :class:`~.zebra_hf.HFZebraStack`) what ``rank`` does not own under ``layout``."""
    attending, hosted = rank in layout.attention_ranks, layout.hosted(rank)
    swap = {}
    for p in stack.expert_parameters():
        kept = torch.empty(p.shape, dtype=p.dtype, device="meta") if attending else p.detach()[hosted].clone()
        swap[id(p)] = torch.nn.Parameter(kept, requires_grad=p.requires_grad)
    if not attending:
        for p in stack.dense_parameters():
            swap[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                             requires_grad=p.requires_grad)
    replace_parameters(stack.model, swap)
    stack.rows = None if attending else {e: i for i, e in enumerate(hosted)}


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (meta tensors hold none; tied tensors count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p.device.type != "meta":
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def gather_state(stack, layout, rank: int) -> dict:
    """The full state dict on every rank: dense tensors from the first attention rank, expert rows from their
    hosts (collective; the same call order on every rank)."""
    experts = {id(p) for p in stack.expert_parameters()}
    hosted = layout.hosted(rank)
    gathered = {}
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            routed = id(p) in experts
            shape = (stack.c.experts, *p.shape[1:]) if routed else p.shape
            mine = torch.zeros(shape, dtype=p.dtype)
            if routed and hosted:
                mine[hosted] = p if stack.rows is not None else p[hosted]
            elif not routed and rank == layout.attention_ranks[0]:
                mine.copy_(p)
            dist.all_reduce(mine)
            gathered[name] = mine
    return {k: gathered.get(k, v) for k, v in stack.model.state_dict().items()}


def full_copy(stack, layout, rank: int) -> torch.nn.Module:
    """A whole copy of ``stack.model`` gathered from the owners (collective), without gradients: what
    evaluation runs on every rank with transformers' own forward."""
    import copy

    state = gather_state(stack, layout, rank)
    model = copy.deepcopy(stack.model)  # meta tensors copy as meta: no storage until replaced
    replace_parameters(model, {id(p): torch.nn.Parameter(state[n], requires_grad=False) for n, p in model.named_parameters()})
    return model


def owned_bytes(stack, layout, rank: int) -> int:
    """Parameter bytes ``rank`` owns under ``layout`` (what :func:`keep_part` leaves it), for any zebra stack:
    the dense part on an attention rank, its hosted share of the (equal-sized) experts on an expert rank."""
    def size(ps):
        return sum(p.numel() * p.element_size() for p in ps)

    if rank in layout.attention_ranks:
        return size(stack.dense_parameters())
    return size(stack.expert_parameters()) * len(layout.hosted(rank)) // stack.c.experts

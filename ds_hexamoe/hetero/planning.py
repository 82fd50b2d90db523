"""The one planning entry: from routing statistics and device profiles to an applied-ready plan.

Every plan the runtime makes goes through :func:`make_plan` (rank 0 plans with the placement planner and
broadcasts, so all ranks apply the same plan), with a :class:`~ds_hexamoe.placement.ModelShape` whose
sequence length :func:`shape_for_stats` infers from the statistics, for the global micro-batch of
:func:`global_micro_batch`. Its one caller is :class:`~ds_hexamoe.hetero.state.PlanState` (docs/placement.md).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..distributed import dist_on
from ..experts import RoutingStats, experts_modules, weight_names
from ..placement.options import PlanOptions
from ..placement.plan import Plan
from ..placement.planner import plan as placement_plan
from ..placement.shapes import ModelShape


def moe_layers(model) -> list[tuple[str, int, int]]:
    """``(name, num_experts, top_k)`` of every MoE experts module, in call order."""
    cfg = getattr(model, "config", None)
    out = []
    for name, m in experts_modules(model):
        w = getattr(m, weight_names(m)["w1"])
        E = getattr(m, "num_experts", None) or w.size(0)
        k = getattr(m, "top_k", None) or getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", None) or 1
        out.append((name, int(E), int(k)))
    return out


def model_shape_for(model, seq_len: int | None = None) -> ModelShape:
    """The planner's :class:`ModelShape` of ``model``: from its transformers config when it has one, else
    from the experts' weight shapes; byte sizes follow the model's dtype (FSSDP keeps fp32 gradients
    and masters)."""
    layers = moe_layers(model)
    mods = experts_modules(model)
    w1 = getattr(mods[0][1], weight_names(mods[0][1])["w1"])
    pbytes = w1.element_size()
    opt = 8 + (4 if w1.dtype != torch.float32 else 0)  # Adam moments (+ fp32 master)
    shape = None
    cfg = getattr(model, "config", None)
    if cfg is not None:
        try:
            shape = ModelShape.from_hf_config(cfg, seq_len=seq_len)
        except (ConfigError, TypeError):
            shape = None
    if shape is None or shape.num_moe_layers != len(layers) or shape.num_experts != layers[0][1]:
        has_gate = getattr(mods[0][1], "has_gate", True)
        d = w1.size(-1)
        f = w1.size(1) // (2 if has_gate else 1)
        if d > f * (2 if has_gate else 1):  # stored transposed ([E, d, 2f])
            d, f = w1.size(1), w1.size(-1) // (2 if has_gate else 1)
        dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in f".{n}")
        heads = getattr(cfg, "num_attention_heads", 1) or 1
        shape = ModelShape(hidden=int(d), expert_ffn=int(f), num_experts=layers[0][1], top_k=layers[0][2],
                           num_moe_layers=len(layers), seq_len=seq_len or 128, num_heads=int(heads), vocab_size=1,
                           gated=bool(has_gate), bias=bool(getattr(mods[0][1], "has_bias", False)))
        # the formula's dense part (2 * vocab * hidden + attention) replaced by the counted dense parameters
        shape.vocab_size = max(1, (dense - shape.dense_params + 2 * shape.hidden) // (2 * shape.hidden))
    return dataclasses.replace(shape, param_bytes=pbytes, grad_bytes=4, optimizer_bytes=opt)


def micro_tokens(shape: ModelShape, global_batch: int, world: int) -> int:
    """Tokens of one rank's micro-batch on average: what a measured profile times (see ``resolve_profiles``)."""
    return -(-global_batch // max(1, world)) * shape.seq_len


def infer_seq_len(stats: RoutingStats, global_batch: int, world: int) -> int | None:
    """Tokens per sample, from statistics summed over ``world`` ranks.

    ``stats.forwards`` counts one forward per rank and micro-batch, so a forward saw ``global_batch /
    world`` samples on average: ``seq = tokens * world / (forwards * global_batch)``. None without data."""
    tokens = max(stats.tokens.values()) if stats.tokens else 0
    if not tokens or stats.forwards <= 0 or global_batch <= 0:
        return None
    seq = round(tokens * world / (stats.forwards * global_batch))
    return int(seq) if seq >= 1 else None


def shape_for_stats(shape: ModelShape, stats: RoutingStats | None, global_batch: int, world: int) -> ModelShape:
    """``shape`` with the sequence length the statistics were recorded at (unchanged when they tell none)."""
    seq = infer_seq_len(stats, global_batch, world) if stats is not None else None
    if seq is None or seq == shape.seq_len:
        return shape
    return dataclasses.replace(shape, seq_len=seq)


def make_plan(options: PlanOptions, profiles, stats: RoutingStats, shape: ModelShape, global_batch: int, *,
              group=None) -> Plan:
    """Every rank plans with :func:`ds_hexamoe.placement.plan` (so an infeasible plan fails on all ranks alike),
    then rank 0's plan is broadcast: every rank returns the same plan.

    ``options``: :meth:`PlanOptions.from_config` of the job; ``global_batch``: samples per micro-step over all
    ranks (:func:`global_micro_batch`). A collective inside a process group."""
    rank = dist.get_rank(group) if dist_on() else 0
    out = placement_plan(profiles, stats, global_batch=global_batch, model_shape=shape, options=options)
    if dist_on() and dist.get_world_size(group) > 1:  # the planner is deterministic; rank 0's plan is applied
        box = [out.to_dict() if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        out = Plan.from_dict(box[0])
    return out


def global_micro_batch(ds_config: dict, world: int) -> int:
    """Samples per micro-step over all ranks: what plans split into batch shares (the planner's ``global_batch``)."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if micro is None and ds_config.get("train_batch_size") is not None:
        micro = int(ds_config["train_batch_size"]) // (int(ds_config.get("gradient_accumulation_steps", 1)) * world)
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"train_micro_batch_size_per_gpu: got {micro!r}; heterogeneous planning splits "
                          "train_micro_batch_size_per_gpu * WORLD_SIZE samples per micro-step over the ranks (set it)")
    return micro * world


def at_least_one(shares: list[int]) -> list[int]:
    """Every rank runs every step: a rank the plan left without samples gets one from the largest share."""
    s = list(shares)
    for r in range(len(s)):
        if s[r] == 0:
            big = max(range(len(s)), key=lambda q: s[q])
            if s[big] <= 1:
                raise ConfigError(f"train_micro_batch_size_per_gpu: the global micro-batch ({sum(s)} samples) is too "
                                  f"small to give each of {len(s)} ranks a sample; raise it")
            s[big] -= 1
            s[r] += 1
    return s

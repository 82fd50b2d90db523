"""Resume on another number of ranks: the dense ZeRO-1/2 optimizer state re-partitioned exactly from every
old rank's partition, the experts re-sharded by FSSDP (docs/design.md, "Checkpoints you can trust").

DeepSpeed loads the module weights and the schedule of a checkpoint saved with any number of ranks, but its
ZeRO-1/2 optimizer partitions only when saved as "elastic". The files of a normal save hold, per rank, the
flat fp32 partition and the optimizer state of each parameter group, padded on the last rank only; so
stripping each rank's padding and concatenating gives the whole flat group, which the new engine cuts into
its own partitions (DeepSpeed's own elastic restore does that last step).
"""
from __future__ import annotations

import glob
import inspect
import os

import torch

from ...config import ConfigError

_OSD = "optimizer_state_dict"


def zero_files(tag_dir: str, world: int) -> list[str]:
    """The ZeRO optimizer files of the ``world`` ranks that saved ``tag_dir``, in rank order."""
    out = []
    for r in range(world):
        found = sorted(glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")))
        if not found:
            raise ConfigError(f"--resume on another rank count: {tag_dir!r} has no ZeRO optimizer file of rank {r}")
        out.append(found[0])
    return out


def _elastic(osd: dict) -> dict:
    """One old rank's optimizer state dict in DeepSpeed's elastic form: per group, the state without padding."""
    state = osd["base_optimizer_state"]
    groups = state["state"] if isinstance(state, dict) else None
    if groups is None:
        return osd  # saved elastic already
    sizes = [t.numel() for t in osd["single_partition_of_fp32_groups"]]
    base = []
    for i, size in enumerate(sizes):
        st = groups.get(i, {})
        base.append({k: (v[:size] if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= size else v)
                     for k, v in st.items()})
    step = state["param_groups"][0].get("step") if state.get("param_groups") else None
    return {**osd, "base_optimizer_state": base, "base_optimizer_state_step": step}


def restore_dense_optimizer(engine, tag_dir: str, old_world: int) -> None:
    """Fill the engine's ZeRO-1/2 optimizer partitions (fp32 masters and state) from ``old_world`` ranks' files.

    The files are DeepSpeed's own (they hold pickled objects such as the loss scaler) and are read as
    DeepSpeed reads them on every resume, after the manifest has verified them."""
    opt = engine.optimizer
    needed = ("_restore_elastic_base_optimizer_state", "_restore_from_elastic_fp32_weights")
    if not all(hasattr(opt, n) for n in needed):
        raise ConfigError(f"--resume on another rank count: the optimizer {type(opt).__name__} is not DeepSpeed's "
                          "ZeRO-1/2 optimizer; resume with the rank count the checkpoint was saved with")
    raw = [torch.load(f, map_location="cpu", weights_only=False)[_OSD] for f in zero_files(tag_dir, old_world)]
    saved_groups = raw[0]["base_optimizer_state"].get("param_groups") if isinstance(
        raw[0]["base_optimizer_state"], dict) else None
    sds = [_elastic(osd) for osd in raw]
    opt._load_global_state(sds[0])
    opt._restore_elastic_base_optimizer_state(sds)
    opt._restore_from_elastic_fp32_weights(sds)
    for i, group in enumerate(opt.optimizer.param_groups):
        # scalar state (Adam's step) exactly as saved: DeepSpeed's restore pads it to shape [1]
        saved = raw[0]["base_optimizer_state"]["state"].get(i, {}) if saved_groups is not None else {}
        st = opt.optimizer.state[group["params"][0]]
        for k, v in saved.items():
            if torch.is_tensor(v) and v.dim() == 0:
                st[k] = v.clone().to(st[k].device if torch.is_tensor(st.get(k)) else v.device)
    if saved_groups is not None:
        # the groups' hyperparameters as saved: the schedule's current lr lives here, not in its own state
        for group, saved in zip(opt.optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "step")})
    if hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()


def load_on_new_world(engine, ckpt_dir: str, tag: str, old_world: int, **load_kwargs):
    """``engine.load_checkpoint`` of a checkpoint saved on ``old_world`` ranks: module, schedule and client
    state from DeepSpeed, FSSDP experts re-sharded with their optimizer state, dense ZeRO state re-partitioned."""
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if stage > 2:
        raise ConfigError(f"--resume: checkpoint {tag!r} was saved on {old_world} ranks with ZeRO stage {stage}; "
                          "resuming it on another rank count supports ZeRO stages 0-2. Resume with "
                          f"--nproc {old_world}")
    kwargs = dict(load_kwargs)  # load_module_strict=False for an adapters-only (LoRA) checkpoint
    # follow_wrapped=False: FSSDP's wrapper carries functools.wraps of DeepSpeed's method, whose signature lacks it
    if "expert_optimizer_states" in inspect.signature(engine.load_checkpoint, follow_wrapped=False).parameters:
        kwargs["expert_optimizer_states"] = True  # FSSDP re-shards its experts by expert id, any world size
    out = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=stage == 0, **kwargs)
    if out[0] is not None and stage > 0:
        restore_dense_optimizer(engine, os.path.join(ckpt_dir, tag), old_world)
    return out

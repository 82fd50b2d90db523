"""Train a Swin-MoE image classifier from a recipe with DeepSpeed + HexaMoE; prints accuracy before and after.

    deepspeed --num_gpus 2 scripts/train_swin_moe.py recipes/swin-moe-tiny.json [--steps N] [--output-dir DIR]

On a machine without a GPU DeepSpeed picks its CPU accelerator with gloo (2 ranks on 2 CPU processes).
Writes ``metrics.jsonl`` (loss, aux loss, expert balance per log step) and ``summary.json`` (accuracy
before/after) to the recipe's output folder, and the trained model with ``save_pretrained`` to ``hf/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

TRAINING_KEYS = {
    "steps": 100, "micro_batch_size": 32, "grad_accum": 1, "lr": 1e-3, "schedule": "cosine", "warmup_steps": 0,
    "min_lr_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 42, "log_every": 10,
    "output_dir": "outputs/swin-moe", "dtype": "fp32", "adam_betas": [0.9, 0.999], "adam_eps": 1e-8,
}


def load_recipe(path: str) -> tuple[dict, dict]:
    from ds_hexamoe.config import ConfigError, read_json

    recipe = read_json(path, "recipe", "pass a recipe JSON such as recipes/swin-moe-tiny.json")
    training = dict(TRAINING_KEYS)
    for key, value in (recipe.get("training") or {}).items():
        if key not in TRAINING_KEYS:
            if key in ("save_every", "keep_checkpoints", "eval_every", "export_hf", "num_threads"):
                continue  # recipe-worker keys this script does not use
            raise ConfigError(f"training.{key}: unknown key; allowed keys are {sorted(TRAINING_KEYS)}")
        training[key] = value
    if training["schedule"] not in ("cosine", "linear", "constant"):
        raise ConfigError(f"training.schedule: got {training['schedule']!r}; expected 'cosine', 'linear' or 'constant'")
    for key in ("steps", "micro_batch_size", "grad_accum", "log_every"):
        if not isinstance(training[key], int) or training[key] < 1:
            raise ConfigError(f"training.{key}: got {training[key]!r}; expected an integer >= 1")
    return recipe, training


def lr_factor(step: int, t: dict) -> float:
    if step < t["warmup_steps"]:
        return (step + 1) / t["warmup_steps"]
    if t["schedule"] == "constant":
        return 1.0
    progress = min(1.0, (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"] - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t["schedule"] == "cosine" else 1 - progress
    return t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * shape


def ds_config(recipe: dict, t: dict, world: int, accel: str) -> dict:
    ds = dict(recipe.get("deepspeed") or {})
    ds.update(train_micro_batch_size_per_gpu=t["micro_batch_size"], gradient_accumulation_steps=t["grad_accum"],
              train_batch_size=t["micro_batch_size"] * t["grad_accum"] * world, steps_per_print=10**9)
    if t["max_grad_norm"] > 0:
        ds.setdefault("gradient_clipping", t["max_grad_norm"])
    if t["dtype"] in ("bf16", "fp16"):
        ds.setdefault(t["dtype"], {})["enabled"] = True
    if "optimizer" not in ds:
        params = {"lr": t["lr"], "betas": t["adam_betas"], "eps": t["adam_eps"], "weight_decay": t["weight_decay"]}
        if accel == "cpu":
            params["torch_adam"] = True  # DeepSpeed's FusedAdam is a compiled CUDA op
        ds["optimizer"] = {"type": "AdamW", "params": params}
    if recipe.get("hexamoe") is not None:
        ds["hexamoe"] = recipe["hexamoe"]
    return ds


@torch.no_grad()
def evaluate(engine, dataset, collate, mbs: int, rank: int, world: int) -> float:
    """Top-1 accuracy over the whole validation set (each rank a strided shard; counts all-reduced)."""
    was_training = engine.module.training
    engine.eval()
    correct = total = 0
    idx = list(range(rank, len(dataset), world))
    for i in range(0, len(idx), mbs):
        batch = collate([dataset[j] for j in idx[i:i + mbs]])
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine(pixel_values=batch["pixel_values"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    t = torch.tensor([correct, total], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    engine.train(was_training)
    return float(t[0] / t[1].clamp_min(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=None, help="override training.steps")
    ap.add_argument("--output-dir", default=None, help="override training.output_dir")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import ds_hexamoe
    from ds_hexamoe.tasks.image_classification import build_image_task

    recipe, t = load_recipe(args.recipe)
    if args.steps is not None:
        t["steps"] = args.steps
    if args.output_dir is not None:
        t["output_dir"] = args.output_dir
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    accel = get_accelerator().device_name()
    if accel == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out_dir = t["output_dir"]
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(t["seed"])
    base_dir = os.path.dirname(os.path.abspath(args.recipe))
    # rank 0 first: an ImageFolder source fills the datasets cache once
    if rank != 0:
        dist.barrier()
    task = build_image_task(recipe, base_dir=base_dir, seed=t["seed"])
    if rank == 0:
        dist.barrier()
    if task.validation is None:
        raise ds_hexamoe.ConfigError("task_options.validation_fraction: 0 leaves no validation set to report accuracy on")
    cfg = ds_config(recipe, t, world, accel)
    initialize = getattr(ds_hexamoe, "initialize", None) or deepspeed.initialize
    engine, _, _, _ = initialize(
        model=task.model, config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t)),
    )
    mbs = t["micro_batch_size"]
    acc_before = evaluate(engine, task.validation, task.collate, 256, rank, world)
    if rank == 0:
        print(f"[swin-moe] {len(task.train)} train / {len(task.validation)} val images, {world} ranks; "
              f"MoE blocks: {[n for n, _ in task.model.moe_blocks()]}", flush=True)
        print(f"[swin-moe] accuracy before training: {acc_before:.4f}", flush=True)

    sampler = torch.utils.data.DistributedSampler(task.train, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=t["seed"], drop_last=True)
    loader = torch.utils.data.DataLoader(task.train, batch_size=mbs, sampler=sampler, collate_fn=task.collate,
                                         drop_last=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        open(metrics_path, "w").close()
    engine.train()
    step, epoch, t0 = 0, 0, time.perf_counter()
    it = iter(())
    window = []
    while step < t["steps"]:
        loss_sum = aux_sum = 0.0
        for _ in range(t["grad_accum"]):
            try:
                batch = next(it)
            except StopIteration:
                sampler.set_epoch(epoch)
                epoch += 1
                it = iter(loader)
                batch = next(it)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            loss_sum += float(out.loss.detach()) / t["grad_accum"]
            aux_sum += float(out.aux_loss.detach()) / t["grad_accum"] if out.aux_loss is not None else 0.0
        step += 1
        rt = getattr(engine, "hexamoe", None)
        if callable(getattr(rt, "after_step", None)):
            rt.after_step(step)
        window.append(loss_sum)
        if step % t["log_every"] == 0 or step == t["steps"]:
            vals = torch.tensor([sum(window) / len(window), aux_sum])
            dist.all_reduce(vals)
            vals /= world
            bal = [m.counts.float() for _, m in task.model.moe_blocks() if m.counts is not None]
            balance = [float(c.max() / c.mean()) for c in bal]
            rec = {"step": step, "loss": float(vals[0]), "aux_loss": float(vals[1]), "balance": balance,
                   "lr": engine.get_lr()[0], "elapsed_s": time.perf_counter() - t0}
            window = []
            if rank == 0:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[swin-moe] step {step}/{t['steps']} loss {rec['loss']:.4f} aux {rec['aux_loss']:.4f} "
                      f"balance {['%.2f' % b for b in balance]}", flush=True)
    train_s = time.perf_counter() - t0
    acc_after = evaluate(engine, task.validation, task.collate, 256, rank, world)
    summary = {"name": recipe.get("name"), "steps": t["steps"], "world_size": world, "accuracy_before": acc_before,
               "accuracy_after": acc_after, "chance": 1.0 / task.num_labels, "train_s": train_s}
    if rank == 0:
        print(f"[swin-moe] accuracy after training: {acc_after:.4f} (before {acc_before:.4f}, chance "
              f"{1.0 / task.num_labels:.2f}; {t['steps']} steps in {train_s:.1f}s)", flush=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        rt = getattr(engine, "hexamoe", None)
        state = rt.export_state_dict() if rt is not None else engine.module.state_dict()
        task.model.save_pretrained(os.path.join(out_dir, "hf"), state_dict=state)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training throughput of a tiny Mixtral on 2 CPU gloo ranks: FSSDP against DeepSpeed's own options.

Modes (each in its own pair of spawned ranks, same model, data and optimizer):
  fssdp       dense under ZeRO-2, experts fully sharded by ds-hexamoe FSSDP (sparse collectives)
  zero2       ZeRO-2, every rank holds a replica of every expert
  zero3_leaf  ZeRO-3 with the MoE block as a leaf module (deepspeed.utils.set_z3_leaf_modules)
  autoep      DeepSpeed AutoEP ("expert_parallel" section); known to crash with transformers 5.23
Reports tokens/s, peak RSS growth per rank and bytes moved per step, as ratios to FSSDP; prints a table
and writes JSON. Bytes: DeepSpeed's comms logger (message sizes of its collectives) plus, for FSSDP,
the payload its sparse collectives sent. Timings are only comparable within one run of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(args):
    import ds_hexamoe  # noqa: F401
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=max(64, args.seq), num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="hexamoe").float()


def _ds_config(args, mode: str) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": 3 if mode == "zero3_leaf" else 2},
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True},
    }
    if mode == "autoep":
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": 2, "preset_model": "mixtral"}
    return cfg


def _ds_bytes() -> int:
    from deepspeed.comm import comm

    log = getattr(comm, "comms_logger", None)
    if log is None:
        return 0
    return int(sum(size * rec[0] for op in log.comms_dict.values() for size, rec in op.items()))


def _ds_reset() -> None:
    from deepspeed.comm import comm

    log = getattr(comm, "comms_logger", None)
    if log is not None:
        log.comms_dict.clear()


def _worker(rank: int, world: int, mode: str, args) -> dict:
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed("gloo")
    rss0 = _rss_mb()
    model = _model(args)
    ds = _ds_config(args, mode)
    manager = None
    try:
        if mode == "fssdp":
            from ds_hexamoe.config import HexaMoEConfig
            from ds_hexamoe.fssdp import FSSDPManager

            manager = FSSDPManager.shard_model(model, HexaMoEConfig.from_dict(
                {"sharding": "fssdp", "rematerialize": args.remat, "prefetch": True}))
            params = [p for p in model.parameters() if not manager.owns(p)]
        else:
            params = list(model.parameters())
            if mode == "zero3_leaf":
                from deepspeed.utils import set_z3_leaf_modules
                from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

                set_z3_leaf_modules(model, [MixtralSparseMoeBlock])
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
        if manager is not None:
            manager.attach(engine, optimizer_config=ds["optimizer"])
    except Exception as e:  # AutoEP with transformers 5.23 fails here: record it
        return {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.warmup + args.steps)]
    for i, x in enumerate(data):
        if i == args.warmup:
            _ds_reset()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fssdp_bytes = 0
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if i >= args.warmup and manager is not None:
            fssdp_bytes += manager.last_step_comm_stats()["total"]
    torch.distributed.barrier()
    dt = time.perf_counter() - t0
    out = {"mode": mode, "tokens_per_s": args.steps * args.batch * args.seq / dt, "step_s": dt / args.steps,
           "peak_rss_growth_mb": _peak_mb() - rss0, "ds_bytes_per_step": _ds_bytes() / args.steps,
           "fssdp_bytes_per_step": (fssdp_bytes / args.steps) if manager is not None else 0.0,
           "loss": float(loss.detach())}
    out["bytes_per_step"] = out["ds_bytes_per_step"] + out["fssdp_bytes_per_step"]
    if manager is not None:
        out["expert_state_bytes"] = manager.memory_stats()["expert_state_bytes"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="fssdp,zero2,zero3_leaf,autoep")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default="bench_train.json")
    p.add_argument("--timeout", type=float, default=400)
    args = p.parse_args(argv)
    from ds_hexamoe.testing import run_distributed

    results = {}
    for mode in args.modes.split(","):
        try:
            ranks = run_distributed(_worker, args.world, mode, args, init_process_group=False, timeout=args.timeout)
            results[mode] = {"ranks": ranks, "error": next((r["error"] for r in ranks if "error" in r), None)}
        except Exception as e:  # a crash that killed the ranks (not caught inside them)
            results[mode] = {"ranks": [], "error": f"{type(e).__name__}: {str(e)[-300:]}"}
    base = results.get("fssdp", {}).get("ranks") or []
    metrics = ("tokens_per_s", "peak_rss_growth_mb", "bytes_per_step")

    def avg(ranks, key):
        vals = [r[key] for r in ranks if key in r]
        return sum(vals) / len(vals) if vals else None

    table = []
    for mode, res in results.items():
        row = {"mode": mode, "error": res["error"]}
        for m in metrics:
            v, b = avg(res["ranks"], m), avg(base, m)
            row[m] = v
            row[f"{m}_vs_fssdp"] = (v / b) if (v is not None and b) else None
        table.append(row)
    print(f"{'mode':<12}{'tokens/s':>12}{'x fssdp':>9}{'peak MB/rank':>14}{'x fssdp':>9}{'bytes/step':>14}{'x fssdp':>9}  note")
    for row in table:
        def f(v, fmt):
            width = int(fmt.split(".")[0])
            return format(v, fmt) if v is not None else "-".rjust(width)
        print(f"{row['mode']:<12}{f(row['tokens_per_s'], '12.1f')}{f(row['tokens_per_s_vs_fssdp'], '9.2f')}"
              f"{f(row['peak_rss_growth_mb'], '14.1f')}{f(row['peak_rss_growth_mb_vs_fssdp'], '9.2f')}"
              f"{f(row['bytes_per_step'], '14.0f')}{f(row['bytes_per_step_vs_fssdp'], '9.2f')}  {row['error'] or ''}")
    with open(args.json, "w") as fh:
        json.dump({"args": vars(args), "table": table, "raw": results}, fh, indent=1, default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Fine-tuning cost on CPU gloo ranks: full fine-tuning against LoRA, each through ``ds_hexamoe.initialize``
(DeepSpeed ZeRO-2, AdamW, the experts replicated: ``"sharding": "none"``), as ``ds-hexamoe train`` runs them.

Contenders (each in its own fresh set of spawned ranks, same weights, data and optimizer settings):
  full                  every weight trains; experts_implementation "hexamoe"
  hexamoe_lora          PEFT LoRA (attention q/k/v/o modules and the fused expert weights via target_parameters,
                        ds_hexamoe.tasks.peft.lora_config) on experts_implementation "hexamoe"
  peft_grouped_mm_lora  the same LoRA on transformers' "grouped_mm" experts, the "hexamoe" section off (plain
                        DeepSpeed)

Shapes: ``tiny`` is the shipped checkpoint (ds_hexamoe/data/checkpoints/mixtral-tiny, from_pretrained);
``large`` a wider Mixtral built from a config (a few minutes on 2 cores for all three contenders).

Per contender: ``tokens_per_s`` (global tokens per second over the timed steps, rank 0's wall clock),
``peak_bytes_per_rank`` (RSS-based: the largest over ranks of the peak resident set growth from just before the
model is built to the end of the timed steps, ``VmHWM`` after a ``/proc/self/clear_refs`` reset minus
``VmRSS`` then; it holds weights, gradients, optimizer state and activations, not the interpreter and
libraries), ``trainable_params``, ``optimizer_bytes_per_rank`` (bytes of the optimizer's state tensors on
a rank: Adam's moments of the parameters it updates, partitioned by ZeRO-2). Prints a table with ratios to
``full`` and to ``peft_grouped_mm_lora``, checks the issue's goals, and writes JSON with ``uptime``.
FSSDP rows (adapters sharded with their experts) come with ds_hexamoe.fssdp's adapter support.
Timings compare only within one run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from bench_common import Col, Table, uptime, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "ds_hexamoe", "data", "checkpoints", "mixtral-tiny")
SHAPES = {"tiny": dict(path=TINY, seq=128, batch=4),
          "large": dict(config=dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                    num_experts_per_tok=2, max_position_embeddings=512), seq=128, batch=2)}
CONTENDERS = {"full": ("hexamoe", False), "hexamoe_lora": ("hexamoe", True),
              "peft_grouped_mm_lora": ("grouped_mm", True)}
LORA = dict(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
KEYS = ("tokens_per_s", "peak_bytes_per_rank", "trainable_params", "optimizer_bytes_per_rank")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the resident-set high-water mark (Linux ``clear_refs`` 5); returns ``VmRSS`` now in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def _model(shape: dict, impl: str, lora: bool):
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    import ds_hexamoe  # noqa: F401  registers the "hexamoe" experts implementation

    torch.manual_seed(0)
    if "path" in shape:
        model = AutoModelForCausalLM.from_pretrained(shape["path"], experts_implementation=impl, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(MixtralConfig(**shape["config"]), experts_implementation=impl).float()
    model.config.use_cache = False
    if lora:
        from peft import get_peft_model

        from ds_hexamoe.recipes import PeftSpec
        from ds_hexamoe.tasks.peft import lora_config

        model = get_peft_model(model, lora_config(PeftSpec(**LORA)))
    return model


def _optimizer_bytes(engine) -> int:
    """Bytes of the state tensors (Adam's moments) of the optimizer under DeepSpeed's wrapper, on this rank."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
               if hasattr(v, "numel") and v.dim() > 0)


def _rank(rank: int, world: int, shape: dict, name: str, steps: int, warmup: int) -> dict:
    import torch

    from ds_hexamoe.integrations.deepspeed import initialize

    import peft  # noqa: F401  every library loaded before the peak is reset: it measures the run, not imports
    import transformers  # noqa: F401

    impl, lora = CONTENDERS[name]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    before = _reset_peak()
    model = _model(shape, impl, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = {"train_micro_batch_size_per_gpu": shape["batch"], "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "hexamoe": {"enabled": impl == "hexamoe", "sharding": "none"}}
    # plain DeepSpeed (the "hexamoe" section off) gets the trainable parameters, as Hugging Face's Trainer passes them
    params = None if impl == "hexamoe" else [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = initialize(model=model, config=config, model_parameters=params)
    vocab = engine.module.config.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)
    walls = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (shape["batch"], shape["seq"]), generator=gen)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") * 1024 - before
    tokens = shape["batch"] * shape["seq"] * world * steps
    return {"tokens_per_s": tokens / sum(walls), "peak_bytes_per_rank": peak, "trainable_params": trainable,
            "optimizer_bytes_per_rank": _optimizer_bytes(engine), "loss": float(loss.detach())}


def run_shape(shape_name: str, world: int, steps: int, warmup: int, timeout: float) -> dict:
    """Every contender on ``shape_name``: ``{name: {KEYS...}}`` (per-rank figures: the largest over ranks)."""
    from ds_hexamoe.testing import run_distributed

    out = {}
    for name in CONTENDERS:
        res = run_distributed(_rank, world, SHAPES[shape_name], name, steps, warmup, fresh=True, timeout=timeout)
        out[name] = {"tokens_per_s": res[0]["tokens_per_s"],
                     "peak_bytes_per_rank": max(r["peak_bytes_per_rank"] for r in res),
                     "trainable_params": res[0]["trainable_params"],
                     "optimizer_bytes_per_rank": max(r["optimizer_bytes_per_rank"] for r in res)}
        print(f"  {shape_name} {name}: done (loss {res[0]['loss']:.3f})", flush=True)
    return out


def goals(shapes: dict) -> dict:
    """The issue's goals at the largest shape run: LoRA peak memory <= 40% of full fine-tuning's; hexamoe LoRA
    >= 1.1x PEFT + grouped_mm tokens/s with no more peak memory."""
    name = "large" if "large" in shapes else next(iter(shapes))
    c = shapes[name]
    mem = c["hexamoe_lora"]["peak_bytes_per_rank"] / c["full"]["peak_bytes_per_rank"]
    speed = c["hexamoe_lora"]["tokens_per_s"] / c["peft_grouped_mm_lora"]["tokens_per_s"]
    no_more = c["hexamoe_lora"]["peak_bytes_per_rank"] <= c["peft_grouped_mm_lora"]["peak_bytes_per_rank"]
    return {"shape": name, "lora_peak_vs_full": mem, "lora_memory_goal_met": mem <= 0.40,
            "hexamoe_vs_grouped_mm_tokens_per_s": speed, "hexamoe_lora_no_more_memory": no_more,
            "speed_goal_met": speed >= 1.1 and no_more}


def print_table(shapes: dict) -> None:
    table = Table(Col("shape", "<6"), Col("contender", "<21", sep=" "), Col("tok/s", ">9.1f", sep=" "),
                  Col("vs gmm", ">6.2f", "x", " "), Col("peak MiB/rank", ">13.1f", sep=" "),
                  Col("vs full", ">7.2f", "x", " "), Col("trainable", ">11,d", sep=" "),
                  Col("optim MiB/rank", ">14.2f", sep=" "))
    print(table.rule())
    for shape, c in shapes.items():
        for name, r in c.items():
            print(table.row(shape, name, r["tokens_per_s"],
                            r["tokens_per_s"] / c["peft_grouped_mm_lora"]["tokens_per_s"],
                            r["peak_bytes_per_rank"] / 2**20,
                            r["peak_bytes_per_rank"] / c["full"]["peak_bytes_per_rank"], r["trainable_params"],
                            r["optimizer_bytes_per_rank"] / 2**20))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--shapes", default="tiny,large", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--world", type=int, default=2, help="gloo ranks per contender")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per contender before its ranks are killed")
    args = p.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    bad = [s for s in names if s not in SHAPES]
    if bad or not names or args.steps < 1 or args.warmup < 0 or args.world < 1:
        p.error(f"--shapes: unknown {bad} (allowed {sorted(SHAPES)}); --steps >= 1, --warmup >= 0, --world >= 1")
    load = uptime()
    print(f"uptime: {load}", flush=True)
    shapes = {s: run_shape(s, args.world, args.steps, args.warmup, args.timeout) for s in names}
    print_table(shapes)
    g = goals(shapes)
    print(f"goal, LoRA peak <= 40% of full at {g['shape']}: {g['lora_peak_vs_full']:.2f}x -> "
          f"{'met' if g['lora_memory_goal_met'] else 'not met'}")
    print(f"goal, hexamoe LoRA >= 1.1x PEFT+grouped_mm tokens/s with no more memory at {g['shape']}: "
          f"{g['hexamoe_vs_grouped_mm_tokens_per_s']:.2f}x, memory "
          f"{'not more' if g['hexamoe_lora_no_more_memory'] else 'more'} -> {'met' if g['speed_goal_met'] else 'not met'}")
    finite = all(math.isfinite(r[k]) for c in shapes.values() for r in c.values() for k in KEYS)
    result = {"contenders": shapes[g["shape"]], "shapes": shapes, "goals": g, "world": args.world,
              "steps": args.steps, "warmup": args.warmup, "memory_measure": "RSS growth (VmHWM - VmRSS before)",
              "uptime": load, "uptime_end": uptime()}
    write_json(args.json, result)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())

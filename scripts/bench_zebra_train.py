"""Zebra through the CLI: ``ds-hexamoe train`` with ``"hexamoe": {"zebra": {"enabled": true}}`` (the planner's
split) against the same recipe colocated (``"enabled": false``: the planner's plan under DeepSpeed ZeRO-2),
on 2 CPU ranks with declared devices, one emulated slower at attention than at experts. Prints a table and
writes JSON.

    python scripts/bench_zebra_train.py [--pairs 2] [--steps 14] [--json bench_zebra_train.json]
                                        [--attention-slowdown 3.7] [--expert-slowdown 1.25]

Runs alternate (zebra, colocated, zebra, ...), so machine load hits both alike; per run the median
tokens/s of ``metrics.jsonl`` rows from step 3 on (the first two steps warm up). The model: a Mixtral with
hidden 128, ffn 256, 8 experts, top-2, 2 layers, 128 tokens per sample, 8 samples per rank and step,
trained from scratch on the shipped corpus, fp32, no router auxiliary loss (the zebra path has none).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile

from bench_common import Col, Laps, Table, uptime, write_json

MODEL = {"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
         "max_position_embeddings": 256, "output_router_logits": False}


def recipe(out_dir: str, zebra: bool, steps: int, devices: list[dict]) -> dict:
    return {
        "name": "zebra-bench", "task": "causal-lm", "model": {"config": MODEL},
        "tokenizer": {"build": {"vocab_size": 300}},
        "data": {"train_files": ["pkg://ds_hexamoe/data/corpus/*.txt"], "seq_len": 128, "validation_fraction": 0.05},
        "training": {"steps": steps, "micro_batch_size": 8, "lr": 0.003, "warmup_steps": 1, "dtype": "fp32",
                     "log_every": 1, "save_every": 0, "keep_checkpoints": 0, "eval_every": 0, "seed": 11,
                     "output_dir": out_dir, "num_threads": 1, "export_hf": False},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "hexamoe": {"enabled": True, "profile": "declared", "devices": devices, "zebra": {"enabled": zebra}},
        "launcher": {"nproc": 2},
    }


def run_one(root: str, name: str, zebra: bool, steps: int, devices: list[dict]) -> dict:
    work = os.path.join(root, name)
    os.makedirs(work)
    path = os.path.join(work, "recipe.json")
    write_json(path, recipe(os.path.join(work, "run"), zebra, steps, devices), indent=2)
    wall = Laps()
    with wall.lap():
        proc = subprocess.run(["ds-hexamoe", "train", path], cwd=work, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{name}: ds-hexamoe train failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(work, "run", "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    with open(os.path.join(work, "run", "summary.json")) as fh:
        summary = json.load(fh)
    tps = [r["tok_per_s"] for r in rows if r["step"] > 2]
    return {"zebra": zebra, "median_tokens_per_s": statistics.median(tps), "tokens_per_s": tps,
            "wall_s": wall.last, "train_s": summary["train_s"], "last_loss": summary["last_loss"],
            "split": summary.get("zebra"), "plan": (summary.get("report") or {}).get("batch_shares")}


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--attention-slowdown", type=float, default=3.7)
    ap.add_argument("--expert-slowdown", type=float, default=1.25)
    ap.add_argument("--json", default="bench_zebra_train.json")
    a = ap.parse_args(argv)
    cpu = {"name": "cpu", "attn_tflops": 0.05, "expert_tflops": 0.05, "memory_gb": 16, "bandwidth_gbps": 2}
    devices = [cpu, dict(cpu, slowdown=a.attention_slowdown, expert_slowdown=a.expert_slowdown)]
    out = {"uptime_start": uptime(),
           "attention_slowdown": a.attention_slowdown, "expert_slowdown": a.expert_slowdown, "model": MODEL,
           "steps": a.steps, "pairs": []}
    print(f"uptime at start: {out['uptime_start']}")
    root = tempfile.mkdtemp(prefix="bench_zebra_train_")
    try:
        for i in tqdm(range(a.pairs), desc="pairs"):
            pair = {kind: run_one(root, f"{kind}{i}", kind == "zebra", a.steps, devices)
                    for kind in ("zebra", "colocated")}
            pair["zebra_over_colocated"] = pair["zebra"]["median_tokens_per_s"] / pair["colocated"]["median_tokens_per_s"]
            out["pairs"].append(pair)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["uptime_end"] = uptime()
    z = out["pairs"][0]["zebra"]["split"] or {}
    print(f"zebra split: attention ranks {z.get('attention_ranks')}, expert owners {z.get('expert_owner')}, "
          f"{z.get('micro_batches')} micro-batches; planner predicted {z.get('speedup_over_plan', float('nan')):.2f}x")
    t = Table(Col("pair", ">4"), Col("zebra tok/s", ">12.0f", sep=" "), Col("colocated tok/s", ">16.0f", sep=" "),
              Col("zebra/colocated", ">15.2f", "x", sep=" "))
    print(t.header())
    for i, p in enumerate(out["pairs"]):
        print(t.row(i + 1, p["zebra"]["median_tokens_per_s"], p["colocated"]["median_tokens_per_s"],
                    p["zebra_over_colocated"]))
    write_json(a.json, out, indent=2)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TRL's ``SFTTrainer`` on the shipped chat data with a checkpoint loaded with ``experts_implementation="hexamoe"``
and :class:`~ds_hexamoe.callbacks.HexaMoECallback`, end to end.

    python scripts/train_trl_sft.py --output_dir outputs/trl-sft [--experts eager] [--max_steps 8]
    deepspeed --num_gpus 2 scripts/train_trl_sft.py --output_dir outputs/trl-sft --deepspeed hexamoe

The model is the package's shipped tiny Mixtral (``ds_hexamoe/data/checkpoints/mixtral-tiny``, read with
``from_pretrained``); the data are the shipped conversations (``ds_hexamoe/data/chat``, a ``messages`` column),
rendered with the checkpoint's chat template or, as it has none, the package's built-in ``"simple"`` one.
``--experts eager`` runs transformers' own experts loop: the reference the ``"hexamoe"`` losses must equal.
``--deepspeed hexamoe`` trains under DeepSpeed ZeRO-2 with a ``"hexamoe"`` section in its config (written to
``OUTPUT_DIR/ds_config.json``); ``--deepspeed plain`` the same config without it (the reference under the launcher).
The log history goes to ``OUTPUT_DIR/log_history.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from train_hf_trainer import default_ds_config, end_process_groups, shared_ds_config

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_hexamoe")
CHECKPOINT = os.path.join(PKG, "data", "checkpoints", "mixtral-tiny")
CHAT = os.path.join(PKG, "data", "chat", "train.jsonl")


def load_model_and_tokenizer(experts: str):
    import ds_hexamoe  # noqa: F401  (registers "hexamoe")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_hexamoe.recipes.instruct import BUILTIN_TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = BUILTIN_TEMPLATES["simple"]
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, experts_implementation=experts, dtype=torch.float32)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--experts", choices=["hexamoe", "eager"], default="hexamoe")
    ap.add_argument("--max_steps", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--deepspeed", choices=["none", "plain", "hexamoe"], default="none",
                    help="DeepSpeed ZeRO-2, with (hexamoe) or without (plain) a hexamoe section")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)

    import deepspeed  # noqa: F401  (before transformers probes for it, so ds_hexamoe's patch applies)
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from ds_hexamoe.callbacks import HexaMoECallback

    os.makedirs(args.output_dir, exist_ok=True)
    ds_path = None
    if args.deepspeed != "none":
        ds = default_ds_config(0)
        if args.deepspeed == "plain":
            del ds["hexamoe"]
        ds_path = shared_ds_config(args.output_dir, ds)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.experts)
    data = load_dataset("json", data_files=CHAT, split="train")
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        seed=0, data_seed=0, max_length=args.max_length, packing=False, dataloader_num_workers=0, disable_tqdm=True,
        deepspeed=ds_path, use_cpu=not torch.cuda.is_available(),
        bf16=False,  # TRL's default is bf16 autocast (on CPU too): fp32 here, so "hexamoe" and "eager" agree to rounding
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    HexaMoECallback().attach(trainer)
    trainer.train()
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as fh:
            json.dump(trainer.state.log_history, fh, indent=1)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"[trl-sft] experts {args.experts}, world size {config.world_size}: losses {losses}", flush=True)
    end_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())

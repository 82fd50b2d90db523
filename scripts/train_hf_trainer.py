"""The Hugging Face Trainer with DeepSpeed + HexaMoE and :class:`~ds_hexamoe.integrations.trainer.HexaMoECallback`, end to end.

    deepspeed --num_gpus 2 scripts/train_hf_trainer.py --output_dir outputs/hf-trainer [--max_steps 40]

A tiny Mixtral built from a config (no download) learns a synthetic token task (each sequence counts up
by a per-sequence stride modulo the vocabulary, so the next token is predictable). The DeepSpeed config
file (written to ``OUTPUT_DIR/ds_config.json`` unless ``--deepspeed`` names one) carries the ``"hexamoe"``
section; ``import ds_hexamoe`` makes the Trainer's ``deepspeed.initialize`` honour it. The callback puts
expert load, balance, auxiliary loss and bytes moved into the Trainer's logs (``trainer_state.json``,
TensorBoard when installed) and routing statistics into each checkpoint. The log history is also written
to ``OUTPUT_DIR/log_history.json``. ``--model deepseek_v3 --router '{"bias_update_rate": 0.01}'`` trains a tiny
DeepSeek-V3 with ``hexamoe.router`` options in the config (each rank then writes its routers' correction
bias to ``OUTPUT_DIR/router_bias_rank<r>.json``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch


def synthetic_tokens(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq_len)) % vocab
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def default_ds_config(replan_every: int, sharding: str = "none", router: dict | None = None) -> dict:
    hexamoe = {"collect_stats": True, "sharding": sharding, "placement": {"replan_every": replan_every}}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                  "eps": "auto", "torch_adam": True}},
        "steps_per_print": 10**9,
        # no "auto" strings inside "hexamoe": accelerate fills every "auto" of the file from TrainingArguments
        # and rejects keys it does not know (leave "kernels"/"mode" out to get their defaults)
        "hexamoe": hexamoe if router is None else {**hexamoe, "router": router},
    }


def tiny_model(kind: str, vocab: int):
    """A tiny Mixtral (router aux loss 0.01) or DeepSeek-V3 (sigmoid router with a correction bias)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
            output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=False))
    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128, use_cache=False,
        tie_word_embeddings=False))
    with torch.no_grad():  # transformers starts DeepSeek routers at zero (all ties): give them a direction
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


def save_router_bias(model, output_dir: str) -> None:
    """This rank's ``e_score_correction_bias`` per MoE block (named as the router figures), as
    ``router_bias_rank<r>.json``."""
    bias = {n.rsplit(".", 2)[0]: b.tolist() for n, b in model.named_buffers() if n.endswith(".e_score_correction_bias")}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(os.path.join(output_dir, f"router_bias_rank{rank}.json"), "w") as fh:
        json.dump(bias, fh)


def shared_ds_config(output_dir: str, config: dict) -> str:
    """``OUTPUT_DIR/ds_config.json`` holding ``config``: rank 0 writes it, the other ranks wait for the file (no
    process group exists yet)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "ds_config.json")
    if int(os.environ.get("RANK", "0")) == 0:
        with open(path + ".tmp", "w") as fh:
            json.dump(config, fh, indent=2)
        os.replace(path + ".tmp", path)
    else:
        import time

        for _ in range(600):
            if os.path.exists(path):
                break
            time.sleep(0.1)
    return path


def end_process_groups() -> None:
    """An orderly end, as the training worker's: every rank past its collectives, then the groups (FSSDP keeps
    three) shut down before the interpreter does (a gloo group torn down at interpreter exit once ended a rank
    with "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config with a 'hexamoe' section")
    ap.add_argument("--max_steps", type=int, default=40)
    ap.add_argument("--logging_steps", type=int, default=10)
    ap.add_argument("--save_steps", type=int, default=20)
    ap.add_argument("--replan_every", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sharding", choices=["none", "fssdp"], default="none", help="hexamoe.sharding of the generated config")
    ap.add_argument("--model", choices=["mixtral", "deepseek_v3"], default="mixtral")
    ap.add_argument("--router", type=json.loads, default=None, help="hexamoe.router of the generated config (JSON)")
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)

    import ds_hexamoe  # noqa: F401  (registers "hexamoe" and patches deepspeed.initialize)
    import deepspeed  # noqa: F401  (import it now, so the patch applies before transformers probes for it)
    from transformers import Trainer, TrainingArguments

    from ds_hexamoe.integrations.trainer import HexaMoECallback

    os.makedirs(args.output_dir, exist_ok=True)
    ds_path = args.deepspeed or shared_ds_config(args.output_dir,
                                                 default_ds_config(args.replan_every, args.sharding, args.router))
    vocab = 64
    model = tiny_model(args.model, vocab)
    train = synthetic_tokens(512, args.seq_len, vocab, seed=0)
    report = ["tensorboard"] if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else []
    targs = TrainingArguments(
        output_dir=args.output_dir, deepspeed=ds_path, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps, learning_rate=args.lr, warmup_steps=2, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_strategy="steps", report_to=report, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, save_only_model=False,
        # without a GPU, accelerate only sees the launcher's ranks in its MULTI_CPU (gloo) mode
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train)
    callback = HexaMoECallback().attach(trainer)
    trainer.train()
    engine = trainer.model_wrapped
    if args.router is not None:
        save_router_bias(trainer.model, args.output_dir)
    if trainer.is_world_process_zero():
        print(f"[hf-trainer] world size {targs.world_size}, engine {type(engine).__name__}, "
              f"hexamoe runtime attached: {getattr(engine, 'hexamoe', None) is not None}", flush=True)
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as fh:
            json.dump(trainer.state.log_history, fh, indent=1)
        last = [h for h in trainer.state.log_history if "moe/balance" in h]
        if last:
            h = last[-1]
            print(f"[hf-trainer] step {h.get('step')}: loss {h.get('loss')}, moe/balance {h['moe/balance']:.3f}, "
                  f"moe/aux_loss {h.get('moe/aux_loss')}, replans {callback.replans}", flush=True)
    end_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())

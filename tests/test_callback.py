"""HexaMoECallback with the Hugging Face Trainer: figures in the logs, re-planning, statistics with checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ds_hexamoe.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_hf_trainer.py")


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, output_router_logits=True, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg)
    model.set_experts_implementation("hexamoe")
    return model


def test_callback_in_process_matches_router_counts(tmp_path):
    """One process, no DeepSpeed: the saved counts equal a count taken by hooks on Mixtral's own routers."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from train_hf_trainer import synthetic_tokens
    finally:
        sys.path.pop(0)
    from transformers import Trainer, TrainingArguments

    from ds_hexamoe.integrations.trainer import STATS_FILE, HexaMoECallback

    model = _tiny_mixtral()
    seen = {i: torch.zeros(4, dtype=torch.long) for i in range(2)}

    def hook(i):
        def fn(mod, args, out):
            seen[i] += torch.bincount(out[2].reshape(-1), minlength=4)
        return fn

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(hook(i))
    replans = []
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=synthetic_tokens(64, 16, 64))
    cb = HexaMoECallback(replan_every=2, on_replan=lambda stats, step: replans.append((step, stats))).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    logs = [h for h in trainer.state.log_history if "moe/balance" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert h["moe/tokens"] == 2 * 4 * 16
        assert h["moe/balance"] >= 1.0 and "moe/aux_loss" in h
        for l in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts"):
            assert abs(sum(h[f"moe/load/{l}/e{e}"] for e in range(4)) - 1.0) < 1e-9
    assert [s for s, _ in replans] == [2, 4] and replans[-1][1].forwards == 4
    stats = json.load(open(tmp_path / "checkpoint-4" / STATS_FILE))
    for i in range(2):
        per = stats["per_layer"][f"model.layers.{i}.mlp.experts"]
        assert per["counts"] == seen[i].tolist() and per["tokens"] == 4 * 4 * 16
    # the window figures are the per-window differences of the same counts
    l0 = "model.layers.0.mlp.experts"
    total = sum(h[f"moe/load/{l0}/e0"] * h["moe/tokens"] * 2 for h in logs)
    assert round(total) == seen[0][0].item()


def test_bad_arguments():
    from ds_hexamoe.integrations.trainer import HexaMoECallback

    with pytest.raises(ValueError, match="replan_every"):
        HexaMoECallback(replan_every=-1)
    with pytest.raises(ValueError, match="per_expert_max"):
        HexaMoECallback(per_expert_max=-2)


@pytest.mark.slow
def test_trainer_with_deepspeed_on_two_cpu_ranks(tmp_path):
    """``deepspeed --num_gpus 2`` runs the Trainer script; its logs hold expert load figures for both layers."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT, "--output_dir", str(out),
           "--max_steps", "6", "--logging_steps", "2", "--save_steps", "6", "--replan_every", "3",
           "--batch_size", "8", "--seq_len", "32", "--sharding", "fssdp"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=420)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "world size 2, engine DeepSpeedEngine, hexamoe runtime attached: True" in proc.stdout, tail
    history = json.load(open(out / "log_history.json"))
    logs = [h for h in history if "moe/balance" in h]
    assert [h["step"] for h in logs] == [2, 4, 6], history
    layers = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
    for h in logs:
        assert h["moe/tokens"] == 2 * 2 * 8 * 32  # 2 steps x 2 ranks x 8 sequences x 32 tokens
        # experts are FSSDP-sharded: every step gathers some of them
        assert h["moe/balance"] >= 1.0 and h["moe/aux_loss"] > 0 and h["moe/comm_bytes"] > 0
        for l in layers:
            loads = [h[f"moe/load/{l}/e{e}"] for e in range(4)]
            assert abs(sum(loads) - 1.0) < 1e-9 and h[f"moe/load_max/{l}"] == max(loads)
            assert h[f"moe/balance/{l}"] == pytest.approx(max(loads) * 4)
    assert [h["moe/replans"] for h in logs] == [0.0, 1.0, 2.0]
    stats = json.load(open(out / "checkpoint-6" / "hexamoe_routing_stats.json"))
    assert stats["forwards"] == 12  # 6 steps on each of 2 ranks
    for l in layers:
        per = stats["per_layer"][l]
        assert per["tokens"] == 6 * 2 * 8 * 32 and sum(per["counts"]) == per["tokens"] * 2
    state = json.load(open(out / "checkpoint-6" / "trainer_state.json"))
    assert any("moe/balance" in h for h in state["log_history"])
    # the Trainer's Hugging Face weights hold full experts, gathered from the shards by the callback
    from transformers import MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(str(out / "checkpoint-6"), output_loading_info=True)
    assert not info["missing_keys"], info
    assert model.model.layers[0].mlp.experts.gate_up_proj.abs().sum() > 0

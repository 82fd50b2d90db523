"""``hexamoe.router`` through :class:`HexaMoECallback` in the Hugging Face Trainer: aux coefficient 0, z-loss,
DeepSeek-V3's bias update, a frozen router; every value against a plain PyTorch loop or a hand computation
on tiny Mixtral / DeepSeek-V3 checkpoints saved with ``save_pretrained`` and loaded from disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_router_control import E, VOCAB, _deepseek, _mixtral

from ds_hexamoe.config import ConfigError
from ds_hexamoe.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
SCRIPT = os.path.join(SCRIPTS, "train_hf_trainer.py")
LR, STEPS, GA, ROWS = 1e-2, 3, 2, 2


def _from_disk(tmp_path, build):
    model = build()
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path)
    return type(model).from_pretrained(path).float().train()


def _rows(n: int = 16, seq: int = 10) -> list[dict]:
    """Token rows, every third padded after 6 tokens (labels -100 there), so masks and label counts matter."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (seq,), generator=g)
        mask = torch.ones(seq, dtype=torch.long)
        if i % 3 == 0:
            mask[6:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def _trainer(tmp_path, model, callbacks=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=ROWS,
                             gradient_accumulation_steps=GA, max_steps=STEPS, learning_rate=LR,
                             lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0,
                             optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no", seed=0)
    return Trainer(model=model, args=args, train_dataset=_rows(), callbacks=callbacks)


def _record_batches(model) -> list[dict]:
    """The micro-batches the Trainer feeds ``model`` in training forwards, in order."""
    seen: list[dict] = []

    def pre(_m, _args, kwargs):
        if _m.training:
            seen.append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")})

    model.register_forward_pre_hook(pre, with_kwargs=True)
    return seen


def _hand_loss(model, window: list[dict], z_coef: float) -> tuple[torch.Tensor, float]:
    """One optimizer step's loss as the Trainer defines it (CE summed over the window's label tokens over their
    count) plus the z-loss of each micro-batch (router rows under the mask, layers pooled) averaged over the
    window; and the logged figure: the z-loss pooled over every router row of the window (padding included, as
    :meth:`RouterControl.figures` counts them)."""
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    loss, lse2, rows = 0.0, 0.0, 0.0
    for b in window:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].reshape(-1), reduction="sum")
        keep = b["attention_mask"].reshape(-1).bool()
        sq = torch.cat([torch.logsumexp(l.float(), -1).pow(2) for l in out.router_logits])
        loss = loss + ce / n + z_coef * sq[keep.repeat(len(out.router_logits))].mean() / len(window)
        lse2, rows = lse2 + float(sq.detach().sum()), rows + sq.numel()
    return loss, z_coef * lse2 / rows


def _reference_params(model, batches: list[dict], z_coef: float, lr: float = LR) -> tuple[list, list[float]]:
    """A plain PyTorch loop (AdamW, constant rate) over the Trainer's own micro-batches: parameters, losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for s in range(len(batches) // GA):
        loss, _ = _hand_loss(model, batches[s * GA:(s + 1) * GA], z_coef)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return [p.detach().clone() for p in model.parameters()], losses


def _check_against_reference(tmp_path, router: dict, z_coef: float) -> tuple[list[dict], list[dict]]:
    from ds_hexamoe.callbacks import HexaMoECallback

    model = _from_disk(tmp_path, lambda: _mixtral(aux_coef=0.5))
    ref = _from_disk(tmp_path, lambda: _mixtral(aux_coef=0.5))
    batches = _record_batches(model)
    trainer = _trainer(tmp_path, model)
    HexaMoECallback(router=router).attach(trainer)
    assert model.config.output_router_logits is False  # aux coef 0: router logits are no longer requested
    trainer.train()
    assert len(batches) == STEPS * GA
    params, losses = _reference_params(ref, batches, z_coef)
    for (name, p), q in zip(model.named_parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    for h, want in zip(logs, losses):
        assert h["loss"] == pytest.approx(want, abs=2e-4)  # the Trainer rounds logged losses
    return logs, batches


def test_aux_coef_zero_trains_on_the_plain_lm_loss(tmp_path):
    logs, _ = _check_against_reference(tmp_path, {"aux_loss_coef": 0.0}, z_coef=0.0)
    assert all("router/imbalance/model.layers.0.mlp" in h for h in logs)
    assert all(h["router/z_loss"] == 0.0 for h in logs)


def test_z_loss_is_added_to_the_backpropagated_loss(tmp_path):
    coef = 0.1
    logs, batches = _check_against_reference(tmp_path, {"aux_loss_coef": 0.0, "z_loss_coef": coef}, z_coef=coef)
    with torch.no_grad():  # the first window on the initial weights: the logged figure is the hand value
        _, z_first = _hand_loss(_from_disk(tmp_path, lambda: _mixtral(aux_coef=0.5)), batches[:GA], coef)
    assert z_first > 0.05  # large enough that leaving it out would fail the parameter check
    assert logs[0]["router/z_loss"] == pytest.approx(z_first, rel=1e-5)


def test_bias_after_steps_is_the_formula_on_the_recorded_loads(tmp_path):
    from ds_hexamoe.callbacks import HexaMoECallback

    gamma = 0.01
    model = _from_disk(tmp_path, _deepseek)
    seen: list[list[torch.Tensor]] = [[], []]
    for l, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, o, l=l: seen[l].append(o[2].detach()) if m.training else None)
    trainer = _trainer(tmp_path, model, callbacks=[HexaMoECallback(router={"bias_update_rate": gamma})])
    trainer.train()
    for l, layer in enumerate(model.model.layers):
        assert len(seen[l]) == STEPS * GA
        expect = torch.zeros(E)
        for s in range(STEPS):  # each step's loads: both micro-batches of its window
            load = torch.bincount(torch.cat(seen[l][s * GA:(s + 1) * GA]).reshape(-1), minlength=E).float()
            expect += gamma * torch.sign(load.mean() - load)
        assert expect.abs().sum() > 0
        torch.testing.assert_close(layer.mlp.gate.e_score_correction_bias, expect)


def test_frozen_router_is_unchanged_and_has_no_optimizer_state(tmp_path):
    from ds_hexamoe.callbacks import HexaMoECallback

    model = _from_disk(tmp_path, _mixtral)
    gates = [l.mlp.gate.weight for l in model.model.layers]
    before = [w.detach().clone() for w in gates]
    embed = model.model.embed_tokens.weight.detach().clone()
    trainer = _trainer(tmp_path, model, callbacks=[HexaMoECallback(router={"freeze": True})])  # on_init_end
    trainer.train()
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(w) in held for w in gates) and len(held) > 0
    assert not any(id(w) in {id(p) for p in trainer.optimizer.state} for w in gates)
    assert all(torch.equal(a, w) for a, w in zip(before, gates)) and all(w.grad is None for w in gates)
    assert not torch.equal(embed, model.model.embed_tokens.weight)  # the rest trains


def test_too_late_or_unbound_options_are_refused_before_training(tmp_path):
    from ds_hexamoe.callbacks import HexaMoECallback

    model = _from_disk(tmp_path, _mixtral)
    trainer = _trainer(tmp_path, model)
    trainer.add_callback(HexaMoECallback(router={"freeze": True}))  # first seen in on_train_begin
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.freeze: the Trainer's optimizer already exists"):
        trainer.train()
    trainer = _trainer(tmp_path, _from_disk(tmp_path, _mixtral), callbacks=[HexaMoECallback(router={"z_loss_coef": 0.1})])
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.z_loss_coef: .*attach\(trainer\)"):
        trainer.train()
    model = _from_disk(tmp_path, _mixtral)
    trainer = _trainer(tmp_path, model)
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.freeze"):
        HexaMoECallback(router={"freeze": True}).attach(trainer)
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.bias_update_rate: .*'mixtral'"):
        HexaMoECallback(router={"bias_update_rate": 0.01}).attach(_trainer(tmp_path, _from_disk(tmp_path, _mixtral)))


def test_trl_sft_trainer_gets_the_z_loss_and_coef_zero(tmp_path):
    """TRL's SFTTrainer (its own loss from fused log-probabilities, its own aux switch) on the shipped checkpoint:
    parameters after the steps equal the plain loop on CE + z-loss over the micro-batches it fed."""
    sys.path.insert(0, SCRIPTS)
    try:
        from train_trl_sft import CHAT, load_model_and_tokenizer
    finally:
        sys.path.pop(0)
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from ds_hexamoe.callbacks import HexaMoECallback

    coef, lr = 0.1, 1e-3
    model, tok = load_model_and_tokenizer("hexamoe")
    ref, _ = load_model_and_tokenizer("eager")
    batches = _record_batches(model)
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=GA, learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0,
                       logging_steps=1, save_strategy="no", report_to=[], seed=0, max_length=48, packing=False,
                       disable_tqdm=True, use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=CHAT, split="train"),
                         processing_class=tok)
    HexaMoECallback(router={"aux_loss_coef": 0.0, "z_loss_coef": coef}).attach(trainer)
    assert trainer.aux_loss_enabled is False
    trainer.train()
    assert len(batches) == 2 * GA
    params, _ = _reference_params(ref.train(), batches, coef, lr)
    for (name, p), q in zip(model.named_parameters(), params):  # Adam steps of ~lr: 1e-5 tells a missing z-loss
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_bias_on_two_deepspeed_ranks_is_shared_and_equals_the_formula(tmp_path):
    """``deepspeed --num_gpus 2`` runs the Trainer script on a DeepSeek-V3 with ``hexamoe.router.bias_update_rate``
    in the DeepSpeed config, 2 micro-batches per step: both ranks end with the same bias, equal to the formula on
    each step's loads summed over ranks and micro-batches (the logged ``router/load`` fractions)."""
    gamma, steps = 0.01, 3
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT, "--output_dir", str(out),
           "--model", "deepseek_v3", "--router", json.dumps({"bias_update_rate": gamma}), "--grad_accum", "2",
           "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "100", "--replan_every", "0",
           "--batch_size", "2", "--seq_len", "16"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    history = [h for h in json.load(open(out / "log_history.json")) if "router/z_loss" in h]
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    biases = [json.load(open(out / f"router_bias_rank{r}.json")) for r in range(2)]
    assert biases[0] == biases[1] and len(biases[0]) == 2
    for name, got in biases[0].items():
        expect = torch.zeros(E, dtype=torch.float64)
        for h in history:
            load = torch.tensor([h[f"router/load/{name}/e{e}"] for e in range(E)], dtype=torch.float64)
            diff = load.mean() - load
            expect += gamma * torch.sign(diff.masked_fill(diff.abs() < 1e-12, 0.0))
        assert expect.abs().sum() > 0
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expect, rtol=0, atol=1e-6)

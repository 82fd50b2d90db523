"""``ds-hexamoe train`` with ``hexamoe.zebra``: 2 gloo ranks through DeepSpeed's launcher train a tiny Mixtral
disaggregated (rank 0 attention, rank 1 every expert); the exported model equals one process replaying the
same samples through transformers' own forward with AdamW, the schedule and clipping. Bad zebra settings are
named before any work."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import cli_tiny
from ds_hexamoe.config import ConfigError, HexaMoEConfig

STEPS, MBS = 3, 4
PROMPTS = ["GNU General", "The license"]
ZEBRA = {"enabled": True, "attention_ranks": [0], "shares": [2 * MBS], "expert_owner": [1, 1, 1, 1],
         "micro_batches": 2}


def _recipe(root, zebra=ZEBRA, training=None) -> str:
    return cli_tiny.tiny_recipe(root, steps=STEPS, save_every=0, micro_batch_size=MBS, hexamoe={"zebra": zebra},
                                training={"export_hf": True, "max_grad_norm": 0.05, **(training or {})})


def _replay(recipe_path):
    """One process, transformers' forward: the same global micro-batches in the same order (the worker's one
    data order, :class:`~ds_hexamoe.worker.BatchPlan`, as one rank holding the whole global micro-batch)."""
    from ds_hexamoe.recipes import load_recipe, lr_lambda
    from ds_hexamoe.distributed import seed_all
    from ds_hexamoe.tasks.base import WorkerContext, task_builder
    from ds_hexamoe.worker import BatchPlan

    recipe = load_recipe(recipe_path)
    t = recipe.training
    seed_all(t.seed)
    ctx = WorkerContext(output_dir=os.path.join(os.path.dirname(recipe_path), "replay"))
    parts = task_builder(recipe)(recipe, ctx)
    model = parts.whole_model() if parts.whole_model is not None else parts.model  # zebra recipes start on meta
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    order = BatchPlan(parts.train, 2 * MBS, 0, 1, t.seed)
    losses = []
    for i in range(t.steps):
        batch = parts.collate([parts.train[k] for k in order.indices(i)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zebra_train_equals_one_process(tmp_path):
    # evaluation and greedy samples at the last step run on the model gathered from the owners
    path = _recipe(tmp_path, training={"eval_every": STEPS, "generate": {"prompts": PROMPTS, "max_new_tokens": 4}})
    proc = cli_tiny.train([path], cwd=tmp_path, timeout=400)
    assert "zebra, attention ranks [0]" in proc.stdout
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zebra"]["expert_owner"] == [1, 1, 1, 1] and summary["zebra"]["source"] == "hexamoe.zebra"
    rows = cli_tiny.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all(r["zebra"] for r in rows)
    check_run_equals_one_process(path, run, rows)
    assert rows[-1]["generations"] == _greedy(run / "hf", PROMPTS, 4)
    assert math.isfinite(rows[-1]["val_loss"])


def _greedy(hf_dir, prompts, n) -> list[dict]:
    """Greedy continuations by the exported model, as the worker's ``generate_samples`` writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, pad_token_id=pad)
        out.append({"prompt": prompt, "completion": tok.decode(gen[0, ids.size(1):], skip_special_tokens=True)})
    return out



def check_run_equals_one_process(path, run, rows: list[dict]) -> None:
    """The run's losses and its Hugging Face export equal one process replaying the recipe (``_replay``)."""
    from transformers import AutoModelForCausalLM

    ref_losses, ref_state = _replay(path)
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=1e-5)
    got = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).state_dict()
    assert set(got) >= {k for k in ref_state if "inv_freq" not in k}
    for name, want in ref_state.items():
        if name in got:
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=f"{name} after {STEPS} steps")

def test_zebra_settings_are_named_before_work(tmp_path):
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.zebra import check_zebra_recipe

    bad = _recipe(tmp_path, training={"gradient_checkpointing": True})
    with pytest.raises(ConfigError, match=r"training\.gradient_checkpointing"):
        check_zebra_recipe(load_recipe(bad), resume=False)
    with pytest.raises(ConfigError, match=r"hexamoe\.zebra\.enabled"):  # no profiles, no split
        load_recipe(_recipe(tmp_path, zebra={"enabled": True}))
    with pytest.raises(ConfigError, match=r"hexamoe\.sharding"):
        HexaMoEConfig.from_dict({"sharding": "fssdp", "zebra": ZEBRA})
    with pytest.raises(ConfigError, match=r"hexamoe\.zebra\.enabled: .*router_jitter_noise"):
        _auto_rank(0, 2, _recipe(tmp_path), jitter=True)
    proc = cli_tiny.train([_recipe(tmp_path, zebra={**ZEBRA, "shares": [3]})], cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode != 0 and "hexamoe.zebra.shares" in proc.stdout + proc.stderr


HETERO = [{"name": "cpu", "attn_tflops": 0.1, "expert_tflops": 0.1, "memory_gb": 16, "bandwidth_gbps": 5},
          {"name": "cpu", "attn_tflops": 0.1, "expert_tflops": 0.1, "memory_gb": 16, "bandwidth_gbps": 5,
           "slowdown": 3.7, "expert_slowdown": 1.25}]
UNIFORM = [{"name": "V100-32GB", "count": 2}]


def _auto_rank(rank, world, path, jitter=False):
    from transformers import MixtralConfig, MixtralForCausalLM

    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.zebra import zebra_layout

    recipe = load_recipe(path)
    cfg = {k: v for k, v in recipe.model.config.items() if k != "model_type"}
    cfg["router_jitter_noise"] = 0.1 if jitter else 0.0
    model = MixtralForCausalLM(MixtralConfig(**cfg, vocab_size=300))
    ds = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": 1}
    layout, info, _ = zebra_layout(recipe, model, ds, world)
    return (None if layout is None else list(layout.attention_ranks)), info


@pytest.mark.parametrize("devices,zebra", [(HETERO, True), (UNIFORM, False)])
def test_auto_follows_the_planner(tmp_path, devices, zebra):
    # a rank 3.7x slower at attention but 1.25x at experts serves the experts; identical ranks stay colocated
    from ds_hexamoe.testing import run_distributed

    path = cli_tiny.tiny_recipe(tmp_path, micro_batch_size=MBS, hexamoe={
        "zebra": {"enabled": "auto"}, "profile": "declared", "devices": devices})
    for attention, info in run_distributed(_auto_rank, 2, path, timeout=120):
        assert info["source"] == "planner" and info["wins"] is zebra
        assert attention == ([0] if zebra else None)
    if zebra:  # a model the pipeline cannot cut trains colocated under "auto", with the reason
        for attention, info in run_distributed(_auto_rank, 2, path, True, timeout=120):
            assert attention is None and info["source"] == "model" and "router_jitter_noise" in info["why"]


def test_declared_slowdowns_are_emulated_on_the_zebra_path(tmp_path):
    # the colocated run stretches a declared slow rank's work; the zebra run must emulate the same devices
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.tasks.base import WorkerContext
    from ds_hexamoe.worker.zebra import _emulation

    hetero = load_recipe(cli_tiny.tiny_recipe(tmp_path, hexamoe={"profile": "declared", "devices": HETERO}))
    for rank, factors in ((0, (1.0, 1.0)), (1, (3.7, 1.25))):
        clock = _emulation(hetero, WorkerContext(rank=rank, world_size=2))
        try:
            assert (clock.slowdown, clock.expert_slowdown) == factors
        finally:
            clock.uninstall()
    uniform = load_recipe(cli_tiny.tiny_recipe(tmp_path, name="u.json", hexamoe={"profile": "declared",
                                                                                  "devices": UNIFORM}))
    assert _emulation(uniform, WorkerContext(rank=1, world_size=2)) is None


def test_auto_left_colocated_says_why_in_the_summary(tmp_path):
    path = _recipe(tmp_path, zebra={"enabled": "auto"}, training={"steps": 2, "export_hf": False})
    with open(path) as fh:
        data = json.load(fh)
    data["hexamoe"].update(profile="declared", devices=UNIFORM)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
    proc = cli_tiny.train([path], cwd=tmp_path, timeout=300)
    assert 'hexamoe.zebra "auto": the colocated plan runs' in proc.stdout
    z = json.loads((tmp_path / "run" / "summary.json").read_text())["zebra"]
    assert z["ran"] is False and z["source"] == "planner" and z["wins"] is False and z["speedup_over_plan"] < 1
    assert not any(r.get("zebra") for r in cli_tiny.metrics(tmp_path / "run"))


def test_zebra_rows_follow_the_one_data_order():
    # each attention rank reads its layout rows of the global micro-batch every rank addresses alike; an
    # epoch's incomplete last global batch is dropped (ShareSampler's rule), never wrapped into the next
    from ds_hexamoe.hetero import ShareSampler
    from ds_hexamoe.parallel.zebra import ZebraLayout
    from ds_hexamoe.worker import BatchPlan

    data, seed = list(range(21)), 3  # 2 global micro-batches of 8 per epoch, 5 samples left over
    layout = ZebraLayout((1, 0), (3, 5), (2, 2), 2)
    whole = BatchPlan(data, 8, 0, 1, seed)
    assert whole.indices(2) == ShareSampler(21, [8], 0, seed=seed).rows(0, epoch=1)
    for rank in (0, 1):
        plan = BatchPlan(data, 4, rank, 2, seed, shares=list(layout.shares), index=layout.share_index(rank))
        for i in range(5):
            assert plan.indices(i) == whole.indices(i)[layout.rows(rank)]
    assert layout.share_index(2) is None and layout.rows(2) == slice(0, 0)

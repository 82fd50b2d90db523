"""LoRA from recipes (docs/recipes.md, "LoRA: the peft section"): the ``"peft"`` section's errors before launch,
the worker's LoRA steps on 2 gloo ranks against a plain one-process PEFT + torch AdamW reference, and
``ds-hexamoe train recipes/mixtral-tiny-lora.json`` end to end: adapter-only checkpoints that resume exactly,
``adapter/`` loading with ``PeftModel.from_pretrained``, the merged ``hf/`` loading with ``from_pretrained``."""
from __future__ import annotations

import json
import math
import os

import cli_tiny
import pytest
import torch

from ds_hexamoe import cli
from ds_hexamoe.config import ConfigError
from ds_hexamoe.recipes import load_recipe
from ds_hexamoe.testing import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_RECIPE = os.path.join(REPO, "recipes", "mixtral-tiny-lora.json")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _error(overrides: dict, tmp_path) -> str:
    """The ConfigError text of the LoRA recipe with ``overrides``, from load_recipe or the model check."""
    from ds_hexamoe.tasks.peft import check_peft_model

    with pytest.raises(ConfigError) as got:
        check_peft_model(load_recipe(LORA_RECIPE, {"training.output_dir": str(tmp_path / "o"), **overrides}))
    return str(got.value)


@pytest.mark.parametrize("overrides,says", [
    ({"peft.r": 0}, ["peft.r: got 0", "rank"]),
    ({"peft.alpha": 0}, ["peft.alpha: got 0", "alpha / r"]),
    ({"peft.dropout": 0.1}, ["peft.dropout: got 0.1", "0 when peft.target_parameters is set"]),
    ({"peft.target_modules": [], "peft.target_parameters": []}, ["peft.target_modules: got []", "non-empty"]),
    ({"peft.type": "ia3"}, ["peft.type: got 'ia3'", "['lora']"]),
    ({"peft.rank": 4}, ["peft.rank", "unknown"]),
    ({"peft.init": "pissa"}, ["peft.init: got 'pissa'", "'gaussian'"]),
    ({"peft.target_modules": ["q_proj", "qq_proj"]}, ["peft.target_modules: 'qq_proj' matches no module", "'q_proj'"]),
    ({"peft.target_modules": ["experts"]}, ["peft.target_modules: 'experts' matches ['MixtralExperts']",
                                            "peft.target_parameters"]),
    ({"peft.target_parameters": ["mlp.experts.up_proj"]},
     ["peft.target_parameters: 'mlp.experts.up_proj' matches no parameter", "mlp.experts.gate_up_proj"]),
    ({"peft.modules_to_save": ["score"]}, ["peft.modules_to_save: 'score' matches no module"]),
    ({"training.export_hf": False}, ["peft.export_merged: true needs training.export_hf: true"]),
    ({"hexamoe.zebra": {"enabled": True, "attention_ranks": [0], "shares": [4], "expert_owner": [1, 1, 1, 1]}},
     ["hexamoe.zebra.enabled: got True", "colocated"]),
])
def test_bad_peft_sections_name_the_key_and_the_fix(overrides, says, tmp_path):
    msg = _error(overrides, tmp_path)
    for part in says:
        assert part in msg, msg


def test_every_unmatched_target_is_named_at_once_and_validate_reports_it(tmp_path, capsys):
    msg = _error({"peft.target_modules": ["q_prj", "v_prj"], "peft.target_parameters": ["experts.w1"]}, tmp_path)
    assert "'q_prj'" in msg and "'v_prj'" in msg and "'experts.w1'" in msg, msg
    out = str(tmp_path / "o")
    assert cli.main(["validate", LORA_RECIPE, "--set", "training.output_dir=" + json.dumps(out),
                     "--set", 'peft.target_modules=["q_prj"]']) == 2
    assert "peft.target_modules: 'q_prj' matches no module" in capsys.readouterr().err
    assert cli.main(["validate", LORA_RECIPE, "--set", "training.output_dir=" + json.dumps(out)]) == 0
    said = capsys.readouterr().out
    assert "is valid" in said and "peft: LoRA r=8" in said


def test_cluster_lora_recipes_are_templates_whose_sections_validate():
    for name, sharding in (("mixtral-8x7b-lora.json", "fssdp"), ("qwen3-moe-sft-lora.json", "none")):
        path = os.path.join(REPO, "recipes", name)
        with pytest.raises(ConfigError, match="placeholder"):
            load_recipe(path)
        r = load_recipe(path, check_files=False)
        assert r.peft.target_parameters == EXPERTS and r.peft.dropout == 0 and r.data.format == "chat"
        assert r.hexamoe_config.sharding == sharding and r.training.dtype == "bf16"


# -- the worker's LoRA step against one plain PyTorch process ---------------------------------------------

ROWS, SEQ, VOCAB, STEPS, LR = 4, 16, 96, 3, 0.5


def _mixtral(implementation: str):
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation=implementation).float()


def _batch(i: int) -> dict:
    g = torch.Generator().manual_seed(100 + i)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _peft_recipe(root: str) -> str:
    path = cli_tiny.tiny_recipe(root, training={"max_grad_norm": 0.0, "lr": 0.02, "warmup_steps": 1,
                                                "micro_batch_size": ROWS})
    with open(path) as fh:
        data = json.load(fh)
    data["peft"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS,
                    "init": "gaussian"}
    # SGD: an update linear in the gradient, so kernel rounding is not amplified as Adam's g / sqrt(v) does for
    # near-zero gradients (the adapters' B starts at 0); the optimizer is DeepSpeed's, with the recipe's schedule
    data["deepspeed"].update(optimizer={"type": "SGD", "params": {"lr": LR}}, zero_allow_untested_optimizer=True)
    with open(path, "w") as fh:
        json.dump(data, fh)
    return path


def _lora_steps_rank(rank: int, world: int, recipe_path: str) -> dict:
    from ds_hexamoe.tasks.base import TaskParts, WorkerContext
    from ds_hexamoe.tasks.peft import apply_peft
    from ds_hexamoe.worker.colocated import ColocatedStep

    recipe = load_recipe(recipe_path, {"training.micro_batch_size": ROWS // world})
    model = apply_peft(_mixtral("hexamoe"), recipe, log=lambda line: None)
    parts = TaskParts(model=model, train=None, validation=None, collate=None)
    step = ColocatedStep(recipe, WorkerContext(rank=rank, world_size=world), "cpu", parts)
    share = ROWS // world
    micro = iter({k: v[rank * share:(rank + 1) * share] for k, v in _batch(i).items()} for i in range(STEPS))
    losses = [step.step(micro, s).loss for s in range(1, STEPS + 1)]
    optimized = {id(p) for g in step.engine.optimizer.bit16_groups for p in g}
    trainable = {id(p) for p in step.module.parameters() if p.requires_grad}
    return {"losses": losses, "optimizer_is_adapters": optimized == trainable,
            "params": {k: p.detach().clone() for k, p in step.module.named_parameters()}}


def _reference(recipe_path: str) -> dict:
    """Plain PEFT on an "eager" Mixtral in this process, torch SGD and the recipe's schedule, whole batches."""
    from peft import get_peft_model

    from ds_hexamoe.recipes import lr_lambda
    from ds_hexamoe.tasks.peft import lora_config

    recipe = load_recipe(recipe_path)
    t = recipe.training
    base = _mixtral("eager")
    torch.manual_seed(t.seed)  # apply_peft seeds the adapters' init with training.seed
    model = get_peft_model(base, lora_config(recipe.peft))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    losses = []
    for i in range(STEPS):
        loss = model(**_batch(i)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": {k: p.detach() for k, p in model.named_parameters()}}


@pytest.mark.slow
def test_lora_steps_on_two_ranks_equal_plain_peft_in_one_process(tmp_path):
    """Three SGD steps of LoRA (attention modules and expert parameters) through the worker's colocated step
    with the hexamoe kernels on 2 ranks: the losses, the adapters and the frozen base equal one process of plain
    PEFT on the "eager" experts; DeepSpeed's optimizer holds exactly the adapters."""
    path = _peft_recipe(str(tmp_path))
    ref = _reference(path)
    for r in run_distributed(_lora_steps_rank, 2, path, fresh=True):
        assert r["optimizer_is_adapters"]
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert set(r["params"]) == set(ref["params"])
        for k, p in ref["params"].items():
            torch.testing.assert_close(r["params"][k], p, rtol=1e-4, atol=1e-6, msg=k)
    lora = [k for k in ref["params"] if "lora_" in k]
    assert any("experts" in k for k in lora) and any("q_proj" in k for k in lora)
    assert all(ref["params"][k].norm() > 1e-3 for k in lora if "lora_B" in k)  # B starts at 0: the adapters trained


# -- ds-hexamoe train recipes/mixtral-tiny-lora.json --------------------------------------------------------

CLI_STEPS = 8


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    args = [LORA_RECIPE, "--steps", str(CLI_STEPS), "--output-dir", str(root / "run"),
            "--set", "training.save_every=4", "--set", "training.eval_every=4", "--set", "training.log_every=1",
            "--set", "training.num_threads=1", "--set", "training.warmup_steps=1", "--set", "training.keep_checkpoints=0"]
    proc = cli_tiny.train(args, cwd=root, timeout=420)
    return root, args, str(root / "run"), proc.stdout


def _trained(run: str, step: int):
    """The base with the adapters of checkpoint ``step`` loaded into a fresh PEFT model (rank 0's module file)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ds_hexamoe.tasks.peft import lora_config

    recipe = load_recipe(os.path.join(run, "recipe.json"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(recipe.model.path), lora_config(recipe.peft))
    saved = torch.load(os.path.join(run, "checkpoints", f"global_step{step}", "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    return model.eval(), saved, recipe


@pytest.mark.slow
def test_lora_recipe_trains_and_exports_adapters_and_merged_model(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, run, stdout = lora_run
    assert "[ds-hexamoe] LoRA r=8:" in stdout and "trainable parameters" in stdout
    rows = cli_tiny.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, CLI_STEPS + 1)) and all(math.isfinite(r["loss"]) for r in rows)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and val[-1] < val[0], (rows, val)  # the completion loss falls
    with open(os.path.join(run, "summary.json")) as fh:
        summary = json.load(fh)
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5

    model, saved, recipe = _trained(run, CLI_STEPS)
    assert saved and all("lora_" in k for k in saved)  # the checkpoint holds the adapters only
    assert set(saved) == {k for k, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(recipe.model.path)
        adapter = PeftModel.from_pretrained(base, os.path.join(run, "adapter")).eval()
        torch.testing.assert_close(adapter(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf")).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        fresh = AutoModelForCausalLM.from_pretrained(recipe.model.path).eval()
        assert not torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-3)  # the adapters changed the model
    assert not any("lora" in k for k in merged.state_dict())
    out = merged.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


@pytest.mark.slow
def test_lora_recipe_with_experts_sharded_by_fssdp_equals_the_replicated_run(lora_run, tmp_path):
    """The same recipe with ``"sharding": "fssdp"``: each expert's adapter lives with its owner, and the losses,
    the gathered adapter export and the merged export (built from the gathered state) equal the run with the
    experts replicated."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, args, run, _ = lora_run
    sharded = str(tmp_path / "fssdp")
    proc = cli_tiny.train([*args[:3], "--output-dir", sharded, *args[5:], "--set", 'hexamoe.sharding="fssdp"'],
                          cwd=root, timeout=420)
    assert "moved by FSSDP" in proc.stdout
    for a, b in zip(cli_tiny.metrics(run), cli_tiny.metrics(sharded), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    x, y = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (run, sharded))
    assert set(x) == set(y) and any("experts" in k for k in x)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-3, atol=1e-5, msg=k)
    recipe = load_recipe(os.path.join(sharded, "recipe.json"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(recipe.model.path)
        want = PeftModel.from_pretrained(base, os.path.join(sharded, "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(sharded, "hf")).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_adapter_only_checkpoint_resumes_exactly(lora_run, tmp_path):
    root, args, run, _ = lora_run
    crashed = cli_tiny.crashed_copy(run, str(tmp_path / "crashed"), "global_step4",
                                    (f"checkpoints/global_step{CLI_STEPS}", "adapter", "hf"))
    cli_tiny.train([*args[:3], "--output-dir", crashed, *args[5:], "--resume"], cwd=root, timeout=420)
    full, resumed = cli_tiny.metrics(run), cli_tiny.metrics(crashed)
    for a, b in zip(full[4:], resumed[4:]):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a, b)
    assert full[-1]["val_loss"] == resumed[-1]["val_loss"]
    _, a, _ = _trained(run, CLI_STEPS)
    _, b, _ = _trained(crashed, CLI_STEPS)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    from safetensors.torch import load_file

    x, y = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (run, crashed))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_refuses_a_checkpoint_of_another_peft_section(tmp_path):
    from ds_hexamoe.worker.checkpoints import check_resume_compatible, loop_state

    lora = load_recipe(LORA_RECIPE, {"training.output_dir": str(tmp_path / "o")})
    full = load_recipe(LORA_RECIPE, {"training.output_dir": str(tmp_path / "o"), "peft": None})
    state = loop_state(full, 4, 2, 100)
    with pytest.raises(ConfigError, match="peft: the checkpoint was written with peft=None"):
        check_resume_compatible(state, lora, 2, 100)
    check_resume_compatible(loop_state(lora, 4, 2, 100), load_recipe(
        LORA_RECIPE, {"training.output_dir": str(tmp_path / "o"), "peft.export_merged": False}), 2, 100)


def test_an_earlier_adapter_export_is_an_output_that_overwrite_removes(tmp_path):
    from ds_hexamoe.cli.jobs import OUTPUTS, earlier_outputs

    os.makedirs(tmp_path / "adapter")
    assert earlier_outputs(str(tmp_path)) == ["adapter"] and "adapter" in OUTPUTS

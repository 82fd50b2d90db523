"""``ds-hexamoe train`` end to end: 2 CPU ranks through DeepSpeed's real launcher, checkpoints,
metrics, Hugging Face export, and an exact resume from a mid-run checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import cli_tiny
from ds_hexamoe import cli
from ds_hexamoe.config import ConfigError

STEPS = 8


def _tiny_recipe(root) -> str:
    # the shared tiny recipe, with a warm-up, evaluation every 4 steps and the Hugging Face export
    return cli_tiny.tiny_recipe(str(root), steps=STEPS, save_every=4,
                                training={"warmup_steps": 2, "eval_every": 4, "export_hf": True})


def _train(args: list[str], cwd) -> subprocess.CompletedProcess:
    return cli_tiny.train(args, cwd, timeout=420)


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _module_state(ckpt_file: str) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_file, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 8-step run (checkpoints at steps 4 and 8)."""
    root = tmp_path_factory.mktemp("cli")
    recipe = _tiny_recipe(root)
    proc = _train([recipe], cwd=root)
    return root, recipe, str(root / "run"), proc.stdout


@pytest.mark.slow
def test_train_produces_checkpoints_metrics_and_hf_export(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, recipe, run, stdout = full_run
    assert "first loss" in stdout and "last loss" in stdout
    ckpt = os.path.join(run, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read() == f"global_step{STEPS}"
    for step in (4, STEPS):
        files = set(os.listdir(os.path.join(ckpt, f"global_step{step}")))
        assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt", "hexamoe_rank00000.pt", "hexamoe_rank00001.pt"} <= files

    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["tok_per_s"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, [r["loss"] for r in rows]
    assert math.isclose(rows[0]["lr"], 0.003 / 2) and math.isclose(rows[1]["lr"], 0.003)  # warmup, no lr-0 step
    assert [r["step"] for r in rows if "val_loss" in r] == [4, STEPS]
    assert all(r["balance"] is not None and r["balance"] >= 1.0 for r in rows)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["first_loss"] == rows[0]["loss"] and summary["last_loss"] == rows[-1]["loss"]
    assert summary["world_size"] == 2
    saved = json.load(open(os.path.join(run, "recipe.json")))
    assert saved["training"]["steps"] == STEPS and saved["data"]["train_files"][0].startswith(str(root))

    # the export loads with from_pretrained, holds the final weights, and runs
    hf = os.path.join(run, "hf")
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    final = _module_state(os.path.join(ckpt, f"global_step{STEPS}", "mp_rank_00_model_states.pt"))
    exported = model.state_dict()
    assert set(final) == set(exported)
    for name, value in final.items():
        assert torch.equal(exported[name], value), name
    assert len(tok) == 300 and model.config.vocab_size == 300
    ids = tok("This License applies to any program", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert not [n for n in os.listdir(run) if n.startswith(".")], "no temp folders left behind"


@pytest.mark.slow
def test_resume_from_mid_run_checkpoint_is_exact(full_run, tmp_path):
    """A run that crashed after its step-4 checkpoint (and mid-way through saving step 6) resumes
    with the same data order and reproduces the uninterrupted run's later losses bit for bit."""
    root, recipe, run, _ = full_run
    crashed = cli_tiny.crashed_copy(run, str(tmp_path / "crashed"), "global_step4",
                                    (f"checkpoints/global_step{STEPS}", "hf"))
    ckpt = os.path.join(crashed, "checkpoints")
    os.makedirs(os.path.join(ckpt, "global_step6"))  # an interrupted save: never published in 'latest'
    with open(os.path.join(ckpt, "global_step6", "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"truncated")

    proc = _train([recipe, "--resume", "--output-dir", crashed], cwd=root)
    assert "last loss" in proc.stdout
    full, resumed = _metrics(run), _metrics(crashed)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # records after step 4 were redone once
    for a, b in zip(full[4:], resumed[4:]):
        assert a["loss"] == b["loss"], (a, b)
        assert a["lr"] == b["lr"]
    assert full[-1]["val_loss"] == resumed[-1]["val_loss"]
    summary = json.load(open(os.path.join(crashed, "summary.json")))
    assert summary["resumed"] and summary["start_step"] == 4
    assert not os.path.exists(os.path.join(ckpt, "global_step6"))
    assert open(os.path.join(ckpt, "latest")).read() == f"global_step{STEPS}"
    a = _module_state(os.path.join(run, "checkpoints", f"global_step{STEPS}", "mp_rank_00_model_states.pt"))
    b = _module_state(os.path.join(ckpt, f"global_step{STEPS}", "mp_rank_00_model_states.pt"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- the CLI without launching ---------------------------------------------------------------------


def test_cli_checks_before_launching(tmp_path, capsys):
    recipe = _tiny_recipe(tmp_path)
    out = str(tmp_path / "run")
    assert cli.main(["train", recipe, "--resume"]) == 2
    assert "--resume: no complete checkpoint" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoints"))

    os.makedirs(os.path.join(out, "checkpoints"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as fh:
        fh.write("global_step4")
    assert cli.main(["train", recipe]) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run's outputs (checkpoints/latest naming 'global_step4')" in err and "--resume" in err and "--overwrite" in err

    assert cli.main(["train", recipe, "--set", "training.micro_batch_size=0"]) == 2
    assert "training.micro_batch_size: got 0" in capsys.readouterr().err
    assert cli.main(["train", recipe, "--set", "training.lr"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err

    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    assert cli.main(["train", recipe, "--hostfile", str(hosts), "--nproc", "8", "--master-port", "29611",
                     "--steps", "3", "--resume", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert os.path.basename(cmd[0]) == "deepspeed"
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and cmd[cmd.index("--num_gpus") + 1] == "8"
    assert cmd[cmd.index("--master_port") + 1] == "29611"
    script = cmd.index(cli.WORKER)
    assert cmd[script + 1 : script + 3] == ["--recipe", recipe] and cmd[-1] == "--resume"
    from ds_hexamoe.worker import decode_overrides

    ov = decode_overrides(cmd[cmd.index("--overrides") + 1])
    assert ov["training.steps"] == 3 and ov["launcher.hostfile"] == str(hosts)
    assert cli.main(["train", recipe, "--hostfile", str(tmp_path / "nohosts"), "--dry-run"]) == 2
    assert "launcher.hostfile: file" in capsys.readouterr().err

    assert cli.main(["validate", recipe]) == 0
    assert "is valid" in capsys.readouterr().out


def test_cli_delegates_plan_and_profile(monkeypatch):
    calls = []
    fake_plan = types.ModuleType("ds_hexamoe.cli.plan")
    fake_plan.plan_main = lambda argv: calls.append(("plan", argv)) or 0
    fake_prof = types.ModuleType("ds_hexamoe.cli.profile_routing")
    fake_prof.profile_main = lambda argv: calls.append(("profile", argv)) or 3
    monkeypatch.setitem(sys.modules, "ds_hexamoe.cli.plan", fake_plan)
    monkeypatch.setitem(sys.modules, "ds_hexamoe.cli.profile_routing", fake_prof)
    assert cli.main(["plan", "--ranks", "4"]) == 0
    assert cli.main(["profile-routing", "r.json", "--batches", "2"]) == 3
    assert calls == [("plan", ["--ranks", "4"]), ("profile", ["r.json", "--batches", "2"])]


def test_load_recipe_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        cli.load_recipe(str(tmp_path / "missing.json"))


def test_profile_routing_on_a_recipe_feeds_the_planner(tmp_path):
    """``ds-hexamoe profile-routing`` builds the recipe's tokenizer, model and data like ``train`` does and
    writes statistics that ``ds-hexamoe plan`` accepts."""
    from ds_hexamoe.cli.plan import plan_main
    from ds_hexamoe.cli.profile_routing import profile_main
    from ds_hexamoe.experts.stats import RoutingStats

    recipe = _tiny_recipe(tmp_path)
    out = tmp_path / "routing.json"
    assert profile_main([recipe, "--batches", "3", "--out", str(out)]) == 0
    stats = RoutingStats.load_json(out)
    assert stats.layers == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert stats.forwards == 3
    for layer in stats.layers:
        assert stats.tokens[layer] == 3 * 4 * 32  # batches x micro_batch_size x seq_len
        assert sum(stats.counts[layer]) == stats.tokens[layer] * 2  # top-2
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"devices": [{"name": "A100-80GB"}, {"name": "A100-80GB", "slowdown": 3}]}))
    assert plan_main(["--devices", str(devices), "--stats", str(out), "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.load(open(tmp_path / "plan.json"))
    assert plan["batch_shares"][0] > plan["batch_shares"][1]

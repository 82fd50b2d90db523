"""Every bad input of the list is refused by recipe validation, before anything is launched or imported,
with a message that names the dotted key (or the file and line) and the fix."""
from __future__ import annotations

import json
import os

import pytest

from ds_hexamoe import cli
from ds_hexamoe.config import ConfigError
from ds_hexamoe.recipes import load_recipe

from test_cli import _tiny_recipe


def _data(root, text: bytes) -> str:
    path = root / "bad.txt"
    path.write_bytes(text)
    return str(path)


def _devices_file(root, devices) -> str:
    path = root / "devices.json"
    path.write_text(json.dumps({"devices": devices}))
    return str(path)


def _output_is_file(root) -> str:
    path = root / "afile"
    path.write_text("x")
    return str(path)


# (id, overrides built from the tmp folder, what the message starts with, a fragment of the fix)
CASES = [
    ("experts-fewer-than-topk", lambda r: {"model.config.num_experts_per_tok": 8},
     "model.config.num_experts_per_tok: got 8, more than num_local_experts = 4", "lower num_experts_per_tok"),
    ("topk-zero", lambda r: {"model.config.num_experts_per_tok": 0},
     "model.config.num_experts_per_tok: got 0", "integer >= 1"),
    ("shard-weights-vs-ranks", lambda r: {"hexamoe": {"sharding": "fssdp", "shard_weights": [1, 1, 1]}},
     "hexamoe.shard_weights: got 3 weights for 2 ranks", "one weight per rank"),
    ("shard-weights-inf", lambda r: {"hexamoe": {"sharding": "fssdp", "shard_weights": [1, float("inf")]}},
     "hexamoe.shard_weights: got [1.0, inf]", "finite numbers"),
    ("shard-weights-nan", lambda r: {"hexamoe": {"sharding": "fssdp", "shard_weights": [1, float("nan")]}},
     "hexamoe.shard_weights: got [1.0, nan]", "finite numbers"),
    ("devices-unknown-name", lambda r: {"hexamoe": {"profile": "declared", "devices": [{"name": "my-npu"}] * 2}},
     "hexamoe.devices", "built-in table"),
    ("devices-count", lambda r: {"hexamoe": {"profile": "declared", "devices": [{"name": "H100-SXM", "count": 3}]}},
     "hexamoe.devices: 3 device profiles for 2 ranks", "one entry per rank"),
    ("devices-file-contents", lambda r: {"hexamoe": {"profile": "declared", "devices_file": _devices_file(
        r, [{"name": "H100-SXM"}, {"name": "H100-SXM", "slowdown": -2}])}},
     "hexamoe.devices_file (", "slowdown"),
    ("devices-file-count", lambda r: {"hexamoe": {"profile": "declared", "devices_file": _devices_file(
        r, [{"name": "H100-SXM"}])}}, "hexamoe.devices_file (", "one entry per rank"),
    ("task-untrusted-import", lambda r: {"task": "os:system"},
     "task: 'os:system' is not a registered task", '"trust_task_import": true'),
    ("task-trusted-missing", lambda r: {"task": "no_such_module_14a:build", "trust_task_import": True},
     "task: module 'no_such_module_14a'", "importable"),
    ("data-empty", lambda r: {"data.train_files": [_data(r, b"")], "data.validation_fraction": 0},
     "data.train_files: ", "is empty"),
    ("data-too-short", lambda r: {"data.train_files": [_data(r, b"one short line\n")], "data.validation_fraction": 0},
     "data.train_files: 1 file(s) of 15 bytes hold at most", "add data"),
    ("data-not-utf8", lambda r: {"data.train_files": [_data(r, b"fine\nalso fine\ncaf\xe9 latin-1\n" * 400)]},
     "data.train_files: ", "line 3: not UTF-8 text (byte 0xe9"),
    ("lr-nan", lambda r: {"training.lr": float("nan")}, "training.lr: got nan", "finite"),
    ("lr-inf", lambda r: {"training.lr": float("inf")}, "training.lr: got inf", "finite"),
    ("weight-decay-inf", lambda r: {"training.weight_decay": float("inf")}, "training.weight_decay: got inf", "finite"),
    ("seed-negative", lambda r: {"training.seed": -1}, "training.seed: got -1", "integer >= 0"),
    ("zero-stage", lambda r: {"deepspeed": {"zero_optimization": {"stage": 4}}},
     "deepspeed.zero_optimization.stage: got 4", "0, 1, 2 or 3"),
    ("output-dir-is-a-file", lambda r: {"training.output_dir": _output_is_file(r)},
     "training.output_dir: ", "is a file, not a folder"),
    ("output-dir-under-a-file", lambda r: {"training.output_dir": os.path.join(_output_is_file(r), "run")},
     "training.output_dir: ", "cannot be created"),
]


@pytest.mark.parametrize("overrides,start,fix", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, start, fix):
    recipe = _tiny_recipe(tmp_path)
    ov = overrides(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, overrides=ov)
    msg = str(e.value)
    assert msg.startswith(start) and fix in msg, msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_dir_not_writable(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=r"training.output_dir: .* is not writable"):
        load_recipe(recipe, overrides={"training.output_dir": str(locked / "run")})


def test_validate_and_train_refuse_before_launch(tmp_path, capsys, monkeypatch):
    """The same checks through the CLI: exit code 2 and the message, no launch."""
    import ds_hexamoe.cli.train as cli_train

    monkeypatch.setattr(cli_train, "run_job", lambda cmd, env: pytest.fail("launched"))
    recipe = _tiny_recipe(tmp_path)
    assert cli.main(["validate", recipe, "--set", "training.seed=-3"]) == 2
    assert "training.seed: got -3" in capsys.readouterr().err
    assert cli.main(["train", recipe, "--set", "model.config.num_experts_per_tok=0"]) == 2
    assert "model.config.num_experts_per_tok: got 0" in capsys.readouterr().err


def test_resume_with_latest_naming_a_missing_tag(tmp_path, capsys, monkeypatch):
    import ds_hexamoe.cli.train as cli_train

    monkeypatch.setattr(cli_train, "run_job", lambda cmd, env: pytest.fail("launched"))
    recipe = _tiny_recipe(tmp_path)
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("global_step8")
    (ckpt / "global_step4").mkdir()
    assert cli.main(["train", recipe, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "names checkpoint 'global_step8'" in err and "is missing" in err, err


def test_task_import_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """``task: "os:system"`` is neither imported nor called unless the recipe trusts task imports."""
    from ds_hexamoe.recipes import Recipe
    from ds_hexamoe.tasks import task_builder

    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    recipe = _tiny_recipe(tmp_path)
    with pytest.raises(ConfigError, match="trust_task_import"):
        load_recipe(recipe, overrides={"task": "os:system"})
    with pytest.raises(ConfigError, match="trust_task_import"):
        task_builder(Recipe(task="os:system"))  # the worker's own guard, for recipes built in code
    trusted = load_recipe(recipe, overrides={"task": "json:dumps", "trust_task_import": True})
    assert task_builder(trusted) is json.dumps

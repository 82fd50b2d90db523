"""Issue 24, second pass: inputs that imported code, were read wrongly or failed only after launch are refused
by recipe validation, before anything starts, naming the dotted key (or the file and position) and the fix;
``ds-hexamoe validate`` reports every error it finds in one run."""
from __future__ import annotations

import json
import os
import sys

import pytest

import cli_tiny
from ds_hexamoe import cli
from ds_hexamoe.config import ConfigError
from ds_hexamoe.recipes import load_recipe, resolve_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(root, **kw) -> str:
    return cli_tiny.tiny_recipe(str(root), **kw)


def _refused(recipe, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, overrides=overrides)
    return str(e.value)


# -- pkg:// paths never import -------------------------------------------------------------------------------


def test_pkg_path_imports_nothing(tmp_path, monkeypatch):
    """``pkg://evil_mod/...`` with ``evil_mod.py`` in the working directory (and a package whose ``__init__``
    runs) is refused without running either; ``pkg://this`` does not import ``this``."""
    (tmp_path / "evil_mod.py").write_text("open('ran-evil_mod', 'w').close()\n")
    (tmp_path / "evil_pkg").mkdir()
    (tmp_path / "evil_pkg" / "__init__.py").write_text("open('ran-evil_pkg', 'w').close()\n")
    (tmp_path / "evil_pkg" / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe(tmp_path)
    for path in ("pkg://evil_mod/x.txt", "pkg://evil_pkg.data/x.txt", "pkg://this/x.txt"):
        msg = _refused(recipe, {"data.train_files": [path]})
        assert msg.startswith(repr(path)) and "not ds_hexamoe nor a package of an installed distribution" in msg, msg
    assert not (tmp_path / "ran-evil_mod").exists() and not (tmp_path / "ran-evil_pkg").exists()
    assert "evil_mod" not in sys.modules and "evil_pkg" not in sys.modules


def test_pkg_path_still_finds_shipped_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = load_recipe(None)  # the embedded default names its checkpoint and corpus by pkg://
    assert default.model.path == os.path.join(REPO, "ds_hexamoe", "data", "checkpoints", "mixtral-tiny")
    assert os.path.isdir(resolve_path("pkg://ds_hexamoe/data/corpus", None))
    import transformers  # an installed distribution's files, found from its metadata

    folder = resolve_path("pkg://transformers/models/mixtral", None)
    assert os.path.samefile(folder, os.path.join(os.path.dirname(transformers.__file__), "models", "mixtral"))


# -- JSON files: keys given twice, bytes that are not UTF-8 ------------------------------------------------


def _swap(recipe: str, old: str, new: str) -> None:
    text = open(recipe).read()
    assert old in text
    with open(recipe, "w") as fh:
        fh.write(text.replace(old, new, 1))


def _line_of(path: str, fragment: str, nth: int = 0) -> int:
    lines = [i + 1 for i, line in enumerate(open(path).read().splitlines()) if fragment in line]
    return lines[nth]


def test_duplicate_keys_are_refused(tmp_path):
    recipe = _recipe(tmp_path)
    _swap(recipe, '"lr": 0.003,', '"lr": 0.003,\n    "lr": 30.0,')
    msg = _refused(recipe)
    first, second = _line_of(recipe, '"lr"'), _line_of(recipe, '"lr"', 1)
    assert f"'training.lr' appears twice, at line {first} and line {second}" in msg and "remove one" in msg, msg
    recipe = _recipe(tmp_path, name="twice.json")
    _swap(recipe, '"deepspeed":', '"training": {"steps": 1},\n  "deepspeed":')
    msg = _refused(recipe)
    first = _line_of(recipe, '"training"')
    assert f"'training' appears twice, at line {first}" in msg, msg


def test_duplicate_keys_in_devices_and_deepspeed_files(tmp_path):
    devices = tmp_path / "devices.json"
    devices.write_text('{"devices": [{"name": "cpu"},\n {"name": "cpu", "slowdown": 2, "slowdown": 1}]}')
    recipe = _recipe(tmp_path, hexamoe={"profile": "declared", "devices_file": str(devices)})
    msg = _refused(recipe)
    assert msg.startswith("hexamoe.devices_file (") and "'devices[1].slowdown' appears twice, at line 2" in msg, msg
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2,\n "stage": 0}}')
    msg = _refused(_recipe(tmp_path), {"deepspeed": str(ds)})
    assert "'zero_optimization.stage' appears twice, at line 1 and line 2" in msg, msg


def test_files_that_are_not_utf8(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    text = open(recipe, encoding="utf-8").read().replace('"ckpt-tiny"', '"caf\u00e9"')
    with open(recipe, "wb") as fh:
        fh.write(text.encode("latin-1"))
    offset = text.index("\u00e9")
    assert cli.main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert f"recipe {recipe!r}: not UTF-8 text: byte 0xe9 at offset {offset} (line 2)" in err, err
    devices = tmp_path / "devices.json"
    raw = '{"devices": ["cpu", {"name": "r\u00e9seau", "tflops": 1, "memory_gb": 1, "bandwidth_gbps": 1}]}'.encode("latin-1")
    devices.write_bytes(raw)
    msg = _refused(_recipe(tmp_path, name="r2.json"), {"hexamoe": {"profile": "declared", "devices_file": str(devices)}})
    assert msg.startswith(f"hexamoe.devices_file ({devices}): devices file {str(devices)!r}: not UTF-8 text: byte 0xe9 "
                          f"at offset {raw.index(0xe9)} (line 1)"), msg


# -- checked before launch now (each failed only after the ranks started) -----------------------------------


def _devices_file(root, devices) -> str:
    path = root / "devices.json"
    path.write_text(json.dumps({"devices": devices}))
    return str(path)


def _checkpoint(root, weights: bytes | None) -> str:
    """A checkpoint folder: config.json and, unless None, ``model.safetensors`` holding ``weights``."""
    folder = root / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "max_position_embeddings": 64}))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def _safetensors(cut: int = 0) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    whole = len(header).to_bytes(8, "little") + header + bytes(16)
    return whole[: len(whole) - cut]


ZEBRA = {"profile": "declared", "devices": ["cpu", "cpu"], "zebra": {"enabled": True}}
CASES = [
    ("measure-more-devices-than-ranks", lambda r: {"hexamoe": {"profile": "measure", "devices": ["cpu"] * 3}},
     "hexamoe.devices: 3 entries for 2 ranks (launcher.nproc) with \"profile\": \"measure\"",
     "--set 'hexamoe.devices=[{\"name\": \"cpu\"}]'"),
    ("measure-empty-devices", lambda r: {"hexamoe": {"profile": "measure", "devices": []}},
     "hexamoe.devices: 0 entries for 2 ranks", "hexamoe.devices=null"),
    ("zero3-with-fssdp", lambda r: {"deepspeed": {"zero_optimization": {"stage": 3}}, "hexamoe.sharding": "fssdp"},
     'deepspeed.zero_optimization.stage: got 3 with hexamoe.sharding "fssdp"', "use stage 0, 1 or 2"),
    ("slowdown-inf", lambda r: {"hexamoe": {"profile": "declared", "devices": [{"name": "cpu", "slowdown": float("inf")},
                                                                               "cpu"]}},
     "hexamoe.devices[0].slowdown: got inf", "finite number >= 1"),
    ("topk-not-integer", lambda r: {"model.config.num_experts_per_tok": 1.5},
     "model.config.num_experts_per_tok: got 1.5", "expected an integer"),
    ("seed-past-64-bits", lambda r: {"training.seed": 2**64}, f"training.seed: got {2**64}", "< 2**63"),
    ("heads-not-dividing", lambda r: {"model.config.num_attention_heads": 3},
     "model.config.num_attention_heads: got 3, which does not divide hidden_size = 32", "choose a divisor"),
    ("more-heads-than-features", lambda r: {"model.config.num_attention_heads": 64, "model.config.num_key_value_heads": 1},
     "model.config.num_attention_heads: got 64, which does not divide hidden_size = 32", "model.config.head_dim"),
    ("kv-heads-not-dividing", lambda r: {"model.config.num_key_value_heads": 3},
     "model.config.num_key_value_heads: got 3, which does not divide num_attention_heads = 2", "choose a divisor"),
    ("zebra-gradient-checkpointing", lambda r: {"hexamoe": ZEBRA, "training.gradient_checkpointing": True},
     "training.gradient_checkpointing: hexamoe.zebra runs segments", "set it to false"),
    ("safetensors-empty", lambda r: {"model.path": _checkpoint(r, b"")}, "model.path: ", "is empty (0 bytes)"),
    ("safetensors-truncated", lambda r: {"model.path": _checkpoint(r, _safetensors(cut=5))},
     "model.path: ", "is truncated: its tensors need"),
    ("output-dir-not-utf8", lambda r: {"training.output_dir": str(r / "caf\udce9")},
     "training.output_dir: ", "is not UTF-8 (byte 0xe9 at position"),
    ("measure-devices-file-contents", lambda r: {"hexamoe": {"profile": "measure", "devices_file": _devices_file(
        r, ["cpu", {"name": "cpu", "slowdown": -2}])}}, "hexamoe.devices_file (", "devices[1].slowdown: got -2"),
    ("measure-devices-file-unread", lambda r: {"hexamoe": {"profile": "measure", "devices_file": _devices_file(
        r, ["cpu", "cpu"])}}, "hexamoe.devices_file (", 'not read with "profile": "measure"'),
]


@pytest.mark.parametrize("overrides,start,fix", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_before_launch(tmp_path, overrides, start, fix):
    msg = _refused(_recipe(tmp_path), overrides(tmp_path))
    assert msg.startswith(start) and fix in msg, msg


def test_what_trains_still_validates(tmp_path):
    """A whole checkpoint, and heads that do not divide hidden_size with an explicit head_dim, pass."""
    load_recipe(_recipe(tmp_path), overrides={"model.path": _checkpoint(tmp_path, _safetensors())})
    load_recipe(_recipe(tmp_path), overrides={"model.config.num_attention_heads": 3, "model.config.head_dim": 8})


def test_default_recipe_on_one_rank(tmp_path, monkeypatch):
    """``--nproc 1`` with the default recipe (two measured devices) is refused before launch; the message's
    fix (one device entry for every rank) validates."""
    monkeypatch.chdir(tmp_path)
    msg = _refused(None, {"launcher.nproc": 1})
    assert msg.startswith('hexamoe.devices: 2 entries for 1 ranks'), msg
    load_recipe(None, {"launcher.nproc": 1, "hexamoe.devices": [{"name": "cpu"}]})


# -- one validate run reports every error -------------------------------------------------------------------


def test_validate_reports_every_error(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    sets = ["training.lr=\"fast\"", "training.steps=\"many\"", "launcher.bogus=1"]
    assert cli.main(["validate", recipe] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [e.split(":")[2].strip() for e in err] == ["training.steps", "training.lr", "launcher.bogus"], err
    assert cli.main(["validate", recipe, "--set", "training.seed=-3", "--set", "training.lr=0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [e.split(": ")[2] for e in err] == ["training.lr", "training.seed"], err
    sets = ["training.output_dir=" + json.dumps(str(afile)), "data.train_files=[\"nothing-*.txt\"]",
            "hexamoe.shard_weights=[1,1,1]", "deepspeed.zero_optimization.stage=3", "hexamoe.sharding=\"fssdp\"",
            "model.config.num_attention_heads=3"]
    assert cli.main(["validate", recipe] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err.splitlines()
    keys = [e.split(": ")[2] for e in err]
    assert keys == ["training.output_dir", "data.train_files[0]", "model.config.num_attention_heads",
                    "hexamoe.shard_weights", "deepspeed.zero_optimization.stage"], err
    assert all(e.startswith("ds-hexamoe validate: error: ") for e in err)


def test_validate_print_lists_the_paths_to_fill_in(capsys):
    """A GPU-cluster template prints resolved, with its placeholders listed; exit 2: train would refuse it."""
    assert cli.main(["validate", os.path.join(REPO, "recipes", "qwen3-moe.json"), "--print"]) == 2
    out, err = capsys.readouterr()
    assert '"name": "qwen3-moe' in out and '"train_micro_batch_size_per_gpu"' in out, out
    assert "paths still to fill in (train refuses this recipe" in out
    assert "  model.path: /path/to/" in out and "  data.train_files[0]: /path/to/" in out, out
    assert "model.path: '/path/to/" in err and "is a placeholder" in err, err

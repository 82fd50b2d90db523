"""``ds-hexamoe train`` with the recipe's ``"logging"`` section and ``training.generate``: TensorBoard event files
with the expected scalar tags (read back with TensorBoard's own event reader), per-layer router figures and
greedy generations in ``metrics.jsonl``; W&B asked for but not installed is refused before launch."""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os

import pytest

import cli_tiny
from ds_hexamoe.config import ConfigError

LAYERS = ("model.layers.0.mlp", "model.layers.1.mlp")
PROMPTS = ["GNU General", "The license"]


def test_tensorboard_router_figures_and_generations(tmp_path):
    path = cli_tiny.tiny_recipe(str(tmp_path), steps=2, save_every=0, nproc=1,
                                hexamoe={"router": {"aux_loss_coef": 0.02, "z_loss_coef": 0.001}},
                                training={"eval_every": 2, "generate": {"prompts": PROMPTS, "max_new_tokens": 5}})
    data = json.load(open(path))
    data["logging"] = {"tensorboard": True}
    json.dump(data, open(path, "w"))
    proc = cli_tiny.train([path], cwd=str(tmp_path))
    run = tmp_path / "run"
    rows = cli_tiny.metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        layers = r["router"]["layers"]
        assert set(layers) == set(LAYERS)
        for figs in layers.values():
            # 4 rows x 32 tokens x top-2 per step on the one rank
            assert sum(figs["tokens"]) == 4 * 32 * 2 and figs["imbalance"] >= 1.0
            assert 0 < figs["entropy"] <= math.log(4) + 1e-9 and figs["aux_loss"] > 0
            assert figs["z_loss"] > 0
        assert r["router"]["z_loss"] == pytest.approx(sum(f["z_loss"] for f in layers.values()) / 2, rel=1e-9)
        assert r["aux_loss"] > 0
    gens = rows[-1]["generations"]
    assert [g["prompt"] for g in gens] == PROMPTS and all(isinstance(g["completion"], str) for g in gens)
    assert any(g["completion"] for g in gens), gens
    assert "generate: 'GNU General' ->" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(files[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/aux_loss", "train/z_loss", "train/lr", "eval/val_loss"}
    for layer in LAYERS:
        expected |= {f"router/{layer}/{k}" for k in ("imbalance", "entropy", "aux_loss", "z_loss")}
        expected |= {f"router/{layer}/tokens/e{e}" for e in range(4)}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    imb = acc.Scalars(f"router/{LAYERS[0]}/imbalance")
    assert [e.value for e in imb] == pytest.approx([r["router"]["layers"][LAYERS[0]]["imbalance"] for r in rows])
    assert "eval/generations/text_summary" in acc.Tags()["tensors"]


def test_logging_and_generate_errors_before_launch(tmp_path):
    from ds_hexamoe.recipes import load_recipe

    path = cli_tiny.tiny_recipe(str(tmp_path))
    data = json.load(open(path))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"logging\.wandb: true, but the 'wandb' package is not installed; .*"
                                              r"ds-hexamoe\[logging\]"):
            load_recipe({**data, "logging": {"wandb": True}})
    with pytest.raises(ConfigError, match=r"training\.generate: .*training\.eval_every is 0"):
        load_recipe({**data, "training": {**data["training"], "generate": {"prompts": ["a"]}}})
    with pytest.raises(ConfigError, match=r"training\.generate\.prompts"):
        load_recipe({**data, "training": {**data["training"], "eval_every": 1, "generate": {"prompts": []}}})
    with pytest.raises(ConfigError, match=r"logging\.tensorbord: unknown key \(did you mean 'tensorboard'\?\)"):
        load_recipe({**data, "logging": {"tensorbord": True}})


def test_wandb_offline_run_records_the_row_tags(tmp_path, monkeypatch):
    """A real W&B run in offline mode (no network) gets the same tags as TensorBoard; skipped without wandb."""
    pytest.importorskip("wandb")
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.monitor import RunMonitor, scalar_tags

    monkeypatch.setenv("WANDB_SILENT", "true")
    path = cli_tiny.tiny_recipe(str(tmp_path))
    data = json.load(open(path))
    data["logging"] = {"wandb": True, "wandb_mode": "offline", "wandb_project": "t"}
    json.dump(data, open(path, "w"))
    recipe = load_recipe(path)
    layer = {"tokens": [1.0, 2.0, 3.0, 6.0], "imbalance": 2.0, "entropy": 1.2, "aux_loss": 1.1, "z_loss": 0.01}
    rows = [{"step": s, "loss": 3.0 - s, "lr": 1e-3, "aux_loss": 0.5, "router": {"z_loss": 0.01, "layers": {LAYERS[0]: layer}},
             "generations": [{"prompt": "a", "completion": "b"}]} for s in (1, 2)]
    monitor = RunMonitor(recipe, is_main=True)
    for rec in rows:
        monitor.log(rec)
    summary = dict(monitor.wandb.summary)  # step 1 is committed once step 2 is logged
    for tag, value in scalar_tags(rows[0]).items():
        assert summary[tag] == pytest.approx(value), tag
    assert summary["eval/generations"] == "**'a'** -> 'b'"
    monitor.close()
    assert glob.glob(os.path.join(recipe.training.output_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert RunMonitor(recipe, is_main=False).wandb is None  # only rank 0 writes

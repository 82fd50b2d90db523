"""``ds-hexamoe train recipes/swin-moe-tiny.json`` end to end on 2 CPU ranks: the exported Swin-MoE
classifies held-out digits far above chance, and the run reports that validation accuracy itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "swin-moe-tiny.json")


def _exe() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "ds-hexamoe")
    return local if os.path.exists(local) else shutil.which("ds-hexamoe")


def test_swin_recipe_trains_and_exports(tmp_path):
    out = tmp_path / "run"
    cmd = [_exe(), "train", RECIPE, "--steps", "120", "--output-dir", str(out), "--set", "training.log_every=20"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["last_loss"] < summary["first_loss"] * 0.7, summary
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evaluated = [r["step"] for r in rows if "val_accuracy" in r]
    assert evaluated == [100, 120] and summary["eval_step"] == 120, (evaluated, summary)
    assert "validation loss" in proc.stdout and "accuracy" in proc.stdout

    from ds_hexamoe.tasks.image_classification import build_image_task
    from ds_hexamoe.models import SwinMoEForImageClassification

    recipe = json.load(open(RECIPE))
    task = build_image_task(recipe, base_dir=os.path.dirname(RECIPE), seed=recipe["training"]["seed"])
    model = SwinMoEForImageClassification.from_pretrained(str(out / "hf")).eval()
    assert len(model.moe_blocks()) == 2
    batch = task.collate([task.validation[i] for i in range(len(task.validation))])
    with torch.no_grad():
        pred = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    accuracy = (pred == batch["labels"]).float().mean().item()
    print(f"swin-moe-tiny: validation accuracy {accuracy:.3f} after 120 steps (chance 0.1)")
    assert accuracy > 0.4
    # the worker's own figure: the same split, sharded over the ranks and reduced
    assert abs(summary["val_accuracy"] - accuracy) <= 1.5 / len(task.validation), (summary["val_accuracy"], accuracy)

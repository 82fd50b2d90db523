"""``scripts/bench_finetune.py`` at its smallest: one timed step of each contender on the shipped tiny model, one
rank: the JSON has every contender's keys with finite numbers, and LoRA trains fewer parameters with less
optimizer state than full fine-tuning (tests never check timing)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench_finetune  # noqa: E402


@pytest.mark.slow
def test_bench_finetune_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_finetune.main(["--json", str(out), "--shapes", "tiny", "--world", "1", "--steps", "1",
                                "--warmup", "0"]) == 0
    data = json.loads(out.read_text())
    assert set(data["contenders"]) == {"full", "hexamoe_lora", "peft_grouped_mm_lora"} and data["uptime"]
    for name, row in data["contenders"].items():
        assert set(row) == set(bench_finetune.KEYS), name
        assert all(math.isfinite(v) and v > 0 for v in row.values()), (name, row)
    c = data["contenders"]
    assert c["hexamoe_lora"]["trainable_params"] == c["peft_grouped_mm_lora"]["trainable_params"]
    assert c["hexamoe_lora"]["trainable_params"] < c["full"]["trainable_params"] / 5
    assert c["hexamoe_lora"]["optimizer_bytes_per_rank"] < c["full"]["optimizer_bytes_per_rank"] / 5
    assert c["full"]["optimizer_bytes_per_rank"] == 2 * 4 * c["full"]["trainable_params"]  # Adam's two fp32 moments
    assert {"lora_peak_vs_full", "speed_goal_met", "lora_memory_goal_met"} <= set(data["goals"])
    said = capsys.readouterr().out
    assert "uptime:" in said and "hexamoe_lora" in said and "goal, LoRA peak" in said

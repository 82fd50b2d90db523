"""The first run shows the mission: ``ds-hexamoe train`` without a recipe fine-tunes the shipped Hugging Face
checkpoint with FSSDP on a declared heterogeneous pair and reports the plan, predicted against measured
step time, expert bytes against replicated experts, and the export (2 CPU ranks, a few steps)."""
from __future__ import annotations

import json
import os
import re
import subprocess

from cli_tiny import exe as _exe


def test_default_job_fine_tunes_the_shipped_checkpoint_and_reports(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([_exe(), "train", "--steps", "6", "--output-dir", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    said = proc.stdout
    assert "from the embedded default" in said and "initial plan" in said
    shares = json.loads(re.search(r"plan: batch shares (\[[0-9, ]+\])", said).group(1))
    assert sum(shares) == 16 and shares[0] > shares[1] >= 1, shares  # rank 1 declares a 2x slowdown
    m = re.search(r"step time: predicted ([0-9.]+) ms, measured ([0-9.]+) ms", said)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, said[-2000:]
    # measured profiles are calibrated online (steps 3-5, after the step-1 re-measure) and the job re-plans once
    assert "re-plan at step 5" in said and "the prediction is calibrated on steps 3-5" in said, said[-3000:]
    assert re.search(r"expert bytes per step and rank: [0-9.]+ [KM]?B moved by FSSDP against [0-9.]+ [KM]?B", said)
    report = json.load(open(out / "summary.json"))["report"]
    assert len(report["calibration"]["factors"]) == 2 and all(f > 0 for f in report["calibration"]["factors"])
    assert report["replicated_expert_bytes_per_step"] == 2 * 4 * 3 * 64 * 128 * 4  # 2(W-1)/W x fp32 experts, W=2
    assert report["hf_export"] == str(out / "hf") and f"export (from_pretrained loads it): {out / 'hf'}" in said

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.num_local_experts == 4 and os.path.isfile(out / "hf" / "tokenizer.json")

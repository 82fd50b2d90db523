"""``scripts/gpu_check.sh`` on a machine without a GPU: it says so, writes that in its JSON and exits 3; its
zebra section's ranks and comparison, run on CPU and gloo, equal one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run scripts/gpu_check.sh itself")
def test_gpu_check_reports_no_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "NO GPU PRESENT" in proc.stdout
    report = json.loads(out.read_text())
    assert report["status"] == "no_gpu" and report["device"] is None
    assert report["sections"] == {}  # nothing pretends to have run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_section_forced_on_cpu_is_an_error_not_a_pass(tmp_path):
    """A section run without a GPU records an error; it never reports a pass."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--json", str(tmp_path / "g.json"),
                           "--_section", "kernels"], capture_output=True, text=True, timeout=300, check=False,
                          cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="0"))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_RESULT ")]
    assert line, proc.stdout + proc.stderr
    res = json.loads(line[-1].split(" ", 1)[1])
    assert res["status"] == "error", res


def test_gpu_check_zebra_section_runs_on_cpu_ranks():
    """The zebra section's own rank function and comparison (NCCL on a GPU), here on 2 gloo ranks."""
    from ds_hexamoe.testing import run_distributed
    from ds_hexamoe.testing.zebra import DEVICE_CHECK, device_check_errors, device_check_rank

    out = device_check_errors(run_distributed(device_check_rank, 2, "cpu", timeout=120), "cpu")
    assert len(out) == len(DEVICE_CHECK["owners"])
    for res in out.values():
        assert res["backend"] == "gloo" and res["compared"] >= 10
        assert res["max_rel_err"] <= 1e-5, res

"""A resume that cannot be blocked or destroyed: a failed save (disk full) names the disk and the intact
checkpoint, every rank checks the manifest itself, and a half-written metrics row is dropped, not fatal."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import cli_tiny
from ds_hexamoe.testing import run_distributed
from ds_hexamoe.worker.checkpoints import CheckpointCorrupt
from ds_hexamoe.worker.checkpoints import trim_metrics


def test_trim_metrics_drops_a_half_written_row(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)]
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert trim_metrics(path, 2) == 1
    assert [json.loads(x) for x in open(path)] == rows[:2]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
def test_disk_full_names_the_disk_and_the_intact_checkpoint(tmp_path):
    """The step-4 model file is a link to /dev/full (made by the test task once the run started: a plain run
    refuses a folder holding a checkpoint folder), so writing it fails with ENOSPC as on a full disk: the
    run stops naming the disk and step 2 as intact, 'latest' still names step 2, and --resume from it
    finishes the run."""
    root = str(tmp_path)
    recipe = cli_tiny.tiny_recipe(root, steps=4, save_every=2, task="fault_task:build")
    step4 = os.path.join(root, "run", "checkpoints", "global_step4")
    proc = cli_tiny.train([recipe], cwd=root, check=False,
                          extra_env={"HEXAMOE_TEST_FULL": os.path.join(step4, "mp_rank_00_model_states.pt")})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "saving checkpoint 'global_step4'" in log and "the disk holding it is mounted at" in log, log[-4000:]
    assert "global_step2" in log and "last intact checkpoint" in log
    ckpt = os.path.join(root, "run", "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read() == "global_step2"
    shutil.rmtree(step4)  # space freed
    cli_tiny.train([recipe, "--resume"], cwd=root)
    assert [r["step"] for r in cli_tiny.metrics(os.path.join(root, "run"))] == [1, 2, 3, 4]


def _verify(rank, world, tag_dir):
    from ds_hexamoe.tasks.base import WorkerContext
    from ds_hexamoe.worker.checkpoints.store import verify_everywhere

    try:
        verify_everywhere(tag_dir, WorkerContext(rank=rank, world_size=world))
    except CheckpointCorrupt as e:
        return str(e)
    return None


def test_every_rank_verifies_its_share_and_all_agree(tmp_path):
    """The worker's own check (the CLI checks too): 2 gloo ranks split the files and raise the same error."""
    from ds_hexamoe.worker.checkpoints.manifest import checkpoint_files, file_digest, write_manifest

    tag_dir = str(tmp_path / "global_step1")
    os.makedirs(tag_dir)
    for i in range(5):
        with open(os.path.join(tag_dir, f"f{i}.bin"), "wb") as fh:
            fh.write(bytes([i]) * 1000)
    names = checkpoint_files(tag_dir)
    write_manifest(tag_dir, {n: file_digest(os.path.join(tag_dir, n)) for n in names}, {"step": 1, "world_size": 2})
    assert run_distributed(_verify, 2, tag_dir, timeout=120) == [None, None]
    with open(os.path.join(tag_dir, "f3.bin"), "r+b") as fh:  # checked by rank 1 (files split round-robin)
        fh.seek(500)
        fh.write(b"\x07")
    errors = run_distributed(_verify, 2, tag_dir, timeout=120)
    assert errors[0] == errors[1] and os.path.join(tag_dir, "f3.bin") in errors[0] and "SHA-256" in errors[0]

"""Checkpoints you can trust: rank state files that load with ``weights_only=True`` (a crafted pickle runs
nothing), a manifest of checksums that refuses flipped bytes and names the file, ``--resume-fallback`` to
the newest checkpoint that verifies, and a resume that changes nothing on disk until every rank loaded."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import cli_tiny
from ds_hexamoe.worker.checkpoints import store as ck
from ds_hexamoe.worker.checkpoints.manifest import MANIFEST, CheckpointCorrupt, file_digest, verify_checkpoint

STEPS = 4


# -- rank state files ------------------------------------------------------------------------------


def test_rank_state_round_trips_every_rng_with_weights_only(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    path = str(tmp_path / "hexamoe_rank00000.pt")
    ck.save_rank_state(path, 7, {"step": 7})
    want = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.load(path, weights_only=True)  # no pickled objects inside
    assert data["step"] == 7 and data["loop"] == {"step": 7}
    ck.set_rng_state(ck.load_rank_state(path)["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft(path: str, marker: str) -> None:
    torch.save({"format": ck.RANK_STATE_FORMAT, "step": 2, "rng": _Payload(marker)}, path)


def test_crafted_rank_state_runs_nothing(tmp_path):
    path, marker = str(tmp_path / "hexamoe_rank00000.pt"), str(tmp_path / "pwned")
    _craft(path, marker)
    with pytest.raises(CheckpointCorrupt, match="refusing to load"):
        ck.load_rank_state(path)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointCorrupt, match="state file .* is missing"):
        ck.load_rank_state(str(tmp_path / "hexamoe_rank00001.pt"))


# -- end to end: a 2-rank FSSDP run, then damaged copies of it ---------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 4-step FSSDP run on 2 ranks, checkpoints at steps 2 and 4."""
    root = str(tmp_path_factory.mktemp("trust"))
    recipe = cli_tiny.tiny_recipe(root, steps=STEPS, save_every=2, sharding="fssdp")
    cli_tiny.train([recipe], cwd=root)
    return root, recipe, os.path.join(root, "run")


def _copy(full_run, tmp_path) -> tuple[str, str]:
    root, recipe, run = full_run
    out = str(tmp_path / "copy")
    shutil.copytree(run, out)
    return out, os.path.join(out, "checkpoints")


def _flip(path: str, offset_from_end: int = 64) -> None:
    """Flip one bit inside the file's tensor data (the zip's data sit before its directory at the end)."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size // 2 - offset_from_end))
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x10]))


def test_manifest_lists_every_file_with_its_checksum(full_run):
    _, _, run = full_run
    tag_dir = os.path.join(run, "checkpoints", f"global_step{STEPS}")
    manifest = json.load(open(os.path.join(tag_dir, MANIFEST)))
    on_disk = sorted(n for n in os.listdir(tag_dir) if n != MANIFEST)
    assert sorted(manifest["files"]) == on_disk and manifest["world_size"] == 2 and manifest["step"] == STEPS
    assert {"fssdp_rank00000.pt", "fssdp_rank00001.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "mp_rank_00_model_states.pt", "hexamoe_rank00001.pt"} <= set(on_disk)
    for name in on_disk:
        assert manifest["files"][name] == file_digest(os.path.join(tag_dir, name)), name
    for rank in (0, 1):  # the package's own state loads without unpickling objects
        torch.load(os.path.join(tag_dir, f"hexamoe_rank{rank:05d}.pt"), weights_only=True)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "fssdp_rank00001.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_flipped_bytes_are_refused_naming_the_file(full_run, tmp_path, victim):
    root, recipe, _ = full_run
    out, ckpt = _copy(full_run, tmp_path)
    bad = os.path.join(ckpt, f"global_step{STEPS}", victim)
    _flip(bad)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    proc = cli_tiny.train([recipe, "--resume", "--output-dir", out, "--steps", "6"], cwd=root, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert bad in proc.stderr and "SHA-256 differs" in proc.stderr and "--resume-fallback" in proc.stderr
    assert "training 'ckpt-tiny'" not in proc.stdout  # refused before launching anything
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_fallback_resumes_from_newest_verified_checkpoint_exactly(full_run, tmp_path):
    """Step 4's optimizer partition is damaged and the last metrics row is half-written: --resume-fallback
    moves step 4 aside, resumes from step 2 and reproduces the uninterrupted losses of steps 3 and 4."""
    root, recipe, run = full_run
    out, ckpt = _copy(full_run, tmp_path)
    _flip(os.path.join(ckpt, f"global_step{STEPS}", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    with open(os.path.join(out, "metrics.jsonl"), "a") as fh:
        fh.write('{"step": 5, "loss": 4.2')  # a run killed in the middle of a row
    proc = cli_tiny.train([recipe, "--resume-fallback", "--output-dir", out], cwd=root)
    assert "resuming from global_step2" in proc.stdout and "global_step4.corrupt" in proc.stdout
    assert os.path.isdir(os.path.join(ckpt, f"global_step{STEPS}.corrupt"))  # kept for inspection
    assert open(os.path.join(ckpt, "latest")).read() == f"global_step{STEPS}"
    assert verify_checkpoint(os.path.join(ckpt, f"global_step{STEPS}")) == []
    full, resumed = cli_tiny.metrics(run), cli_tiny.metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def test_one_rank_refusing_a_crafted_state_file_changes_nothing(full_run, tmp_path):
    """Rank 1's state file is a crafted pickle whose manifest entry was rewritten to match (whoever can write
    the folder can do that): ``ds-hexamoe train`` tries every rank's file as the ranks load it and refuses it
    before launch, without running it, and neither metrics.jsonl nor the unpublished newer save is touched
    (the ranks' own refusal, should the file change after that check, is tests/test_trust_second_pass_ckpt.py's)."""
    root, recipe, _ = full_run
    out, ckpt = _copy(full_run, tmp_path)
    marker = str(tmp_path / "pwned")
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("global_step2")  # step 4 now looks like a save that never completed
    tag_dir = os.path.join(ckpt, "global_step2")
    victim = os.path.join(tag_dir, "hexamoe_rank00001.pt")
    _craft(victim, marker)
    manifest_path = os.path.join(tag_dir, MANIFEST)
    manifest = json.load(open(manifest_path))
    manifest["files"]["hexamoe_rank00001.pt"] = file_digest(victim)
    json.dump(manifest, open(manifest_path, "w"))
    before = open(os.path.join(out, "metrics.jsonl")).read()
    proc = cli_tiny.train([recipe, "--resume", "--output-dir", out], cwd=root, check=False)
    assert proc.returncode == 2
    log = proc.stdout + proc.stderr
    assert "refusing to load" in proc.stderr and victim in proc.stderr, log[-4000:]
    assert "training 'ckpt-tiny'" not in proc.stdout  # refused before launching anything
    assert not os.path.exists(marker)
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    assert os.path.isdir(os.path.join(ckpt, f"global_step{STEPS}"))


def test_missing_rank_state_file_is_an_error(full_run, tmp_path):
    root, recipe, _ = full_run
    out, ckpt = _copy(full_run, tmp_path)
    gone = os.path.join(ckpt, f"global_step{STEPS}", "hexamoe_rank00001.pt")
    os.remove(gone)
    proc = cli_tiny.train([recipe, "--resume", "--output-dir", out, "--steps", "6"], cwd=root, check=False)
    assert proc.returncode == 2 and gone in proc.stderr and "missing" in proc.stderr, proc.stderr[-3000:]

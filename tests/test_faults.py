"""A rank killed (SIGKILL) in the middle of expert-parallel, model-centric and LSH training, and inside an
FSSDP shard migration: ``ds-hexamoe train`` ends within seconds naming the intact checkpoint, and
``--resume`` from it redoes the lost steps with the killed run's losses, bit for bit."""
from __future__ import annotations

import os
import shutil
import time

import pytest

import cli_tiny

STEPS, SAVE_EVERY, KILL_AT = 6, 3, 6  # checkpoint at step 3; rows 1-5 logged; rank 1 dies in step 6

MODES = {
    "expert_parallel": ({"mode": "expert_parallel"}, "forward"),
    "model_centric": ({"mode": "model_centric"}, "forward"),
    "lsh": ({"mode": "expert_parallel", "lsh": {"enabled": True}}, "forward"),
    "shard_migration": ({"fssdp": {"reshard_every": 1}}, "migrate"),
}


@pytest.mark.parametrize("case", list(MODES))
def test_rank_killed_mid_training_ends_the_job_and_resumes_exactly(tmp_path, case):
    hexamoe, where = MODES[case]
    root = str(tmp_path)
    recipe = cli_tiny.tiny_recipe(root, steps=STEPS, save_every=SAVE_EVERY, sharding="fssdp", hexamoe=hexamoe,
                                  task="fault_task:build")
    run = os.path.join(root, "run")
    marker = os.path.join(root, "killed_at")
    proc = cli_tiny.train([recipe], cwd=root, check=False, extra_env={
        "HEXAMOE_TEST_KILL": f"1:{KILL_AT}:{where}", "HEXAMOE_TEST_KILL_FILE": marker})
    ended = time.time()
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and os.path.exists(marker), log[-4000:]
    took = ended - float(open(marker).read())
    print(f"{case}: rank 1 killed; ds-hexamoe exited {proc.returncode} {took:.1f}s later")
    assert took < 30, f"the job took {took:.1f}s to end after the kill"  # seconds, not a hang until a timeout
    ckpt = os.path.join(run, "checkpoints")
    assert f"the last complete checkpoint is {os.path.join(ckpt, f'global_step{SAVE_EVERY}')}" in proc.stderr, log[-3000:]
    assert "--resume" in proc.stderr
    killed = cli_tiny.losses(run)
    assert sorted(killed) == list(range(1, KILL_AT)), killed
    shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(root, "killed_metrics.jsonl"))

    cli_tiny.train([os.path.join(run, "recipe.json"), "--resume"], cwd=root)
    resumed = cli_tiny.losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE_EVERY + 1, KILL_AT):  # redone after the checkpoint: the same, bit for bit
        assert resumed[step] == killed[step], (step, killed, resumed)

"""Nothing lost, nothing orphaned: ``--overwrite`` never deletes an input, a lock on the output directory
refuses a second run naming the holder, and a signal to the ``ds-hexamoe`` process alone (SIGTERM,
SIGINT, SIGKILL) ends the launcher and every worker within seconds (real processes, 2 gloo CPU ranks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ds_hexamoe import cli
from ds_hexamoe.cli import jobs
from ds_hexamoe.cli import train as cli_train

from cli_tiny import exe as _exe
from test_cli import _tiny_recipe


def _previous_run(out: str, recipe: str) -> None:
    """An earlier run's outputs in ``out``, its recipe.json being the recipe about to be run again."""
    os.makedirs(os.path.join(out, "checkpoints", "global_step4"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as fh:
        fh.write("global_step4")
    os.makedirs(os.path.join(out, "hf"))
    os.makedirs(os.path.join(out, "tokenizer"))
    for name in ("metrics.jsonl", "summary.json", "notes.txt"):
        with open(os.path.join(out, name), "w") as fh:
            fh.write("{}\n")
    data = json.load(open(recipe))
    data["training"]["output_dir"] = out
    data["data"]["train_files"] = [os.path.join(os.path.dirname(recipe), "data", "*.txt")]
    with open(os.path.join(out, "recipe.json"), "w") as fh:
        json.dump(data, fh)


def test_overwrite_keeps_the_recipe_it_was_given_and_removes_only_outputs(tmp_path, monkeypatch, capsys):
    recipe = _tiny_recipe(tmp_path)
    out = str(tmp_path / "run")
    _previous_run(out, recipe)
    given = os.path.join(out, "recipe.json")
    before = open(given).read()
    launched = []

    def fake_run_job(cmd, env):
        launched.append(cmd)
        assert open(given).read() == before  # the worker reads it after launch
        return 0

    monkeypatch.setattr(cli_train, "run_job", fake_run_job)
    assert cli.main(["train", given, "--overwrite"]) == 0
    assert launched and launched[0][launched[0].index("--recipe") + 1] == given
    assert open(given).read() == before
    assert os.path.exists(os.path.join(out, "notes.txt"))  # not an output of the package
    for name in ("checkpoints", "metrics.jsonl", "summary.json", "hf", "tokenizer"):
        assert not os.path.exists(os.path.join(out, name)), name
    said = capsys.readouterr().out
    for name in ("checkpoints", "metrics.jsonl", "summary.json", "hf", "tokenizer"):
        assert f"--overwrite: removing {os.path.join(out, name)}" in said
    assert f"--overwrite: keeping {given}" in said


def test_overwrite_refuses_to_delete_an_input(tmp_path, monkeypatch, capsys):
    """Fine-tuning the earlier run's own export with --overwrite: refused before anything is deleted."""
    recipe = _tiny_recipe(tmp_path)
    out = str(tmp_path / "run")
    _previous_run(out, recipe)
    hf = os.path.join(out, "hf")
    json.dump({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
               "max_position_embeddings": 64}, open(os.path.join(hf, "config.json"), "w"))
    open(os.path.join(hf, "tokenizer.json"), "w").write("{}")
    monkeypatch.setattr(cli_train, "run_job", lambda cmd, env: pytest.fail("launched"))
    assert cli.main(["train", recipe, "--overwrite", "--output-dir", out, "--set", f"model.path={json.dumps(hf)}",
                     "--set", "model.config=null", "--set", "tokenizer=null"]) == 2
    err = capsys.readouterr().err
    assert "model.path:" in err and "which --overwrite would delete" in err, err
    for name in ("checkpoints/latest", "metrics.jsonl", "hf/config.json", "tokenizer"):
        assert os.path.exists(os.path.join(out, name)), name


def test_lock_names_its_holder_and_is_released(tmp_path, capsys):
    recipe = _tiny_recipe(tmp_path)
    out = str(tmp_path / "run")
    os.makedirs(out)
    lock = jobs.OutputLock(out)
    lock.acquire("ds-hexamoe train first.json")
    try:
        assert cli.main(["train", recipe]) == 2
        err = capsys.readouterr().err
        assert "is in use by another run" in err and f"pid {os.getpid()}" in err and "first.json" in err, err
    finally:
        lock.release()
    again = jobs.OutputLock(out)
    again.acquire("second")
    again.release()


# -- real jobs: a signal to ds-hexamoe alone ends everything -----------------------------------------------


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_training(proc, run_dir: str, log: str, timeout: float = 300.0) -> None:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(metrics) and '"step"' in open(metrics).read():  # a step of this run
            return
        if proc.poll() is not None:
            pytest.fail(f"ds-hexamoe exited early ({proc.returncode}):\n{open(log).read()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no training step within {timeout}s:\n{open(log).read()[-4000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_ds_hexamoe_ends_the_whole_job(tmp_path, sig, capsys):
    """Started as ``ds-hexamoe train OUT/recipe.json --overwrite`` over an earlier run (the issue's data-loss
    case, now with a real launch); while it trains, a second run is refused by the lock; then one signal to
    the ds-hexamoe process ends the runner, the launcher and both workers within seconds."""
    recipe = _tiny_recipe(tmp_path)
    out = str(tmp_path / "run")
    _previous_run(out, recipe)
    given = os.path.join(out, "recipe.json")
    data = json.load(open(given))
    data["training"].update(steps=100000, save_every=0, eval_every=0, log_every=1)
    json.dump(data, open(given, "w"))
    log = str(tmp_path / "log.txt")
    with open(log, "w") as fh:
        proc = subprocess.Popen([_exe(), "train", given, "--overwrite"], cwd=tmp_path, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    job: list[int] = []
    try:
        _wait_training(proc, out, log)
        job = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(job) >= 4, job  # deepspeed runner, launcher, two workers
        assert cli.main(["train", given]) == 2
        assert f"in use by another run (pid {proc.pid} on" in capsys.readouterr().err

        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
        while _alive(job) and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        ended = time.monotonic() - t0
        assert not _alive(job), f"left running after {sig.name}: {_alive(job)}"
        print(f"{sig.name}: ds-hexamoe exited {rc}, whole job gone {ended:.1f}s after the signal")
        assert ended < 30, ended  # "within seconds": the orphans trained on for minutes
        if sig != signal.SIGKILL:
            assert rc == 128 + sig, (rc, open(log).read()[-3000:])
        else:
            assert "the ds-hexamoe process is gone; ending the job" in open(log).read()
        free = jobs.OutputLock(out)
        free.acquire("after")  # released by the kernel even after SIGKILL
        free.release()
    finally:
        for pid in _alive(job + [proc.pid]):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


CHILD = """
import sys, time
from ds_hexamoe.worker.lifeline import arm
assert arm(poll_s=0.1)
print("armed", flush=True)
time.sleep(600)
"""
PARENT = """
import os, socket, subprocess, sys, time
os.environ["HEXAMOE_PARENT"] = f"{os.getpid()}:{os.getpgrp()}:{socket.gethostname()}"
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(600)
"""


def test_worker_ends_when_its_parent_is_killed():
    """A process that armed the lifeline exits within seconds of a SIGKILL of its parent (which can
    forward nothing): the parent-death signal and the watchdog on ``HEXAMOE_PARENT``."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive([child])
        parent.kill()
        parent.wait(timeout=30)
        t0 = time.monotonic()
        while _alive([child]) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        assert not _alive([child])
    finally:
        for pid in _alive([child]):
            os.kill(pid, signal.SIGKILL)

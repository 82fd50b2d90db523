"""What ``ds-hexamoe train`` does around the launcher so nothing is lost and nothing is orphaned
(docs/reliability.md): an exclusive lock on the output directory, an ``--overwrite`` that removes only
the package's own outputs and never an input, and a job in its own process group that every signal
reaches.

Process tree: ``ds-hexamoe`` -> DeepSpeed's runner -> ``deepspeed.launcher.launch`` -> one worker per
rank. The runner is started in a new session, so the runner, the per-node launcher and the workers share
one process group, the job's. SIGTERM, SIGINT and SIGHUP to ``ds-hexamoe`` are forwarded to that group;
after a grace period the group is killed. A SIGKILL of ``ds-hexamoe`` cannot be caught: the workers
watch its pid themselves (:mod:`ds_hexamoe.worker.lifeline`, told by :data:`PARENT_ENV`).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from ..config import ConfigError

LOCK_FILE = ".ds-hexamoe.lock"
# outputs the package writes into training.output_dir; --overwrite removes these and nothing else
OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "hf", "adapter", "recipe.json", "tokenizer")
# env var carrying "pid:pgid:host" of the ds-hexamoe process to the workers (see worker/lifeline.py)
PARENT_ENV = "HEXAMOE_PARENT"
GRACE_S = 10.0  # from the forwarded signal to SIGKILL of the whole job


# -- the output-directory lock ---------------------------------------------------------------------------


class OutputLock:
    """An exclusive ``flock`` on the output directory itself; ``OUT/.ds-hexamoe.lock`` names the holder.

    The kernel drops the lock when the holding process ends, however it ends, so a crashed run never
    leaves a stale lock (only, after a SIGKILL, a stale holder file, which the next run overwrites); a
    run that ends normally removes the holder file."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self, what: str) -> None:
        fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            with contextlib.suppress(OSError), open(self.path, encoding="utf-8", errors="replace") as fh:
                holder = fh.read()
            raise ConfigError(f"training.output_dir: {self.out_dir!r} is in use by another run "
                              f"({_describe_holder(holder)}); wait for it to end, stop it, or pass --output-dir "
                              "for a new folder") from None
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": what}
        with open(self.path, "w") as fh:
            json.dump(info, fh)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


# -- output directory checks and --overwrite --------------------------------------------------------------


def recipe_inputs(recipe) -> dict[str, str]:
    """Every local input the recipe names, as ``{absolute path: dotted key}``."""
    from ..recipes import resolve_data_files

    found: dict[str, str] = {}
    if recipe.source is not None:
        found[os.path.realpath(recipe.source)] = "recipe"
    named = [(recipe.model.path, "model.path"), (recipe.launcher.hostfile, "launcher.hostfile")]
    if recipe.tokenizer is not None:
        named.append((recipe.tokenizer.path, "tokenizer.path"))
    if isinstance(recipe.deepspeed, str):
        named.append((recipe.deepspeed, "deepspeed"))
    for key in ("devices_file", "stats_path"):
        named.append(((recipe.hexamoe or {}).get(key), f"hexamoe.{key}"))
    named += [(p, "data.cache_dir") for p in [recipe.data.cache_dir] if p]
    if recipe.data.train_files:
        files = resolve_data_files(recipe)
        named += [(p, "data.train_files") for p in files.train]
        named += [(p, "data.validation_files") for p in files.validation or []]
    for path, key in named:
        if isinstance(path, str):
            found.setdefault(os.path.realpath(path), key)
    return found


def earlier_outputs(out_dir: str) -> list[str]:
    """What an earlier run left in ``out_dir`` that a new run would overwrite: anything in ``checkpoints/``
    (``latest``, checkpoint folders complete or not), ``metrics.jsonl`` rows, ``summary.json``, ``hf/``, ``adapter/``.
    ``recipe.json`` (often the recipe being run) and ``tokenizer/`` (reused only when its fingerprint
    matches) are not counted."""
    found = []
    ckpt = os.path.join(out_dir, "checkpoints")
    with contextlib.suppress(OSError), open(os.path.join(ckpt, "latest"), encoding="utf-8", errors="replace") as fh:
        found.append(f"checkpoints/latest naming {fh.read().strip()[:80]!r}")
    with contextlib.suppress(OSError):
        names = sorted(n for n in os.listdir(ckpt) if n != "latest")
        if names:
            found.append(f"checkpoints/{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")
    with contextlib.suppress(OSError), open(os.path.join(out_dir, "metrics.jsonl"), "rb") as fh:
        rows = sum(1 for line in fh if line.strip())
        if rows:
            found.append(f"metrics.jsonl with {rows} row(s)")
    found += [name for name in ("summary.json", "hf", "adapter") if os.path.lexists(os.path.join(out_dir, name))]
    return found


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def overwrite_plan(recipe) -> tuple[list[str], list[str]]:
    """``(remove, keep)``: the earlier run's outputs ``--overwrite`` deletes, and those it keeps because
    the recipe being run is one of them. Any other input inside an output is an error, raised here,
    before anything is deleted."""
    out = os.path.realpath(recipe.output_dir)
    inputs = recipe_inputs(recipe)
    remove, keep = [], []
    for name in OUTPUTS:
        p = os.path.join(out, name)
        if not os.path.lexists(p):
            continue
        hits = [(i, k) for i, k in inputs.items() if _inside(i, p)]
        if hits and all(k == "recipe" and i == p for i, k in hits):
            keep.append(p)  # the run rewrites recipe.json with the same resolved recipe
        elif hits:
            i, k = next((i, k) for i, k in hits if not (k == "recipe" and i == p))
            raise ConfigError(f"{k}: {i!r} lies inside {p!r}, which --overwrite would delete; copy it out of "
                              "the output directory first, or pass --output-dir for a new folder")
        else:
            remove.append(p)
    return remove, keep


def remove_outputs(paths: list[str]) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


# -- the job: its own process group, signals forwarded ---------------------------------------------------


def run_job(cmd: list[str], env: dict[str, str], grace_s: float = GRACE_S) -> int:
    """Run ``cmd`` in a new process group; forward SIGTERM/SIGINT/SIGHUP to the group, SIGKILL it after
    ``grace_s``; leave nothing of the group behind. Returns the exit code (128 + signal when stopped)."""
    env = {**env, PARENT_ENV: f"{os.getpid()}:{os.getpgrp()}:{socket.gethostname()}"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got: list[int] = []
    got_at: list[float] = []

    def forward(signum, _frame):
        if not got:
            got_at.append(time.monotonic())
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, forward) for s in sigs}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)  # short waits: a forwarded signal starts the grace clock
                break
            except subprocess.TimeoutExpired:
                if got and time.monotonic() - got_at[0] > grace_s:
                    print(f"[ds-hexamoe] job still running {grace_s:.0f}s after the signal: killing it",
                          file=sys.stderr, flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    got_at[0] = float("inf")  # killed once; now only wait for the runner to be reaped
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the job outlived its runner
    if got:
        print(f"[ds-hexamoe] stopped by {signal.Signals(got[0]).name}; the job was ended", file=sys.stderr, flush=True)
        return 128 + got[0]
    return rc

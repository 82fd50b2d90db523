"""What ``--resume`` may change on disk, and when: the choice of checkpoint (``--resume-fallback``) before
launch, and after every rank has loaded, the trimming of ``metrics.jsonl`` and the removal of saves that
never completed (docs/design.md, "Checkpoints you can trust")."""
from __future__ import annotations

import json
import os

import torch

from ...config import ConfigError
from ...atomic import atomic_write
from .store import _PREFIX, _steps_of, check_resume_compatible, load_rank_state, read_latest
from .manifest import CheckpointCorrupt, corrupt_message, verify_checkpoint

CORRUPT_SUFFIX = ".corrupt"


def trim_metrics(path: str, step: int) -> int:
    """Keep the ``metrics.jsonl`` rows up to ``step``; later ones belong to the run being redone. A row that
    does not parse (the last line of a run killed mid-write) is dropped, not fatal. Returns the rows dropped
    as unreadable."""
    if not os.path.exists(path):
        return 0
    keep, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, "".join(keep))
    return bad


def published_steps(ckpt_dir: str) -> list[tuple[int, str]]:
    """``(step, tag)`` of the checkpoints at or before ``latest``, newest first (later folders never
    completed); every checkpoint folder when ``latest`` is missing or names no folder (only the manifest
    tells then which are complete)."""
    latest = read_latest(ckpt_dir)
    steps = _steps_of(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if latest is None or not latest.startswith(_PREFIX) or not os.path.isdir(os.path.join(ckpt_dir, latest)):
        return sorted(steps, reverse=True)
    upto = int(latest[len(_PREFIX):]) if latest[len(_PREFIX):].isdigit() else max((n for n, _ in steps), default=0)
    return sorted((t for t in steps if t[0] <= upto), reverse=True)


def check_before_resume(ckpt_dir: str, fallback: bool = False, recipe=None, log=print) -> str | None:
    """Before launch: the checkpoint ``--resume`` will load, verified against its manifest in this process
    (the ranks verify again when they load it). With ``fallback``, the newest one that verifies; without,
    :class:`CheckpointCorrupt` naming the bad files. With ``recipe`` (and a known rank count), also refuse
    a data order that would differ. None when there is no usable ``latest`` to check (the caller reports
    that)."""
    if fallback:
        tag = fall_back_to_verified(ckpt_dir, log=log)
    else:
        tag = read_latest(ckpt_dir)
        if tag is None or not os.path.isdir(os.path.join(ckpt_dir, tag)):
            return None
        problems = verify_checkpoint(os.path.join(ckpt_dir, tag))
        if problems:
            raise CheckpointCorrupt(corrupt_message(os.path.join(ckpt_dir, tag), problems))
    _try_loading(os.path.join(ckpt_dir, tag))
    if recipe is not None and recipe.launcher.hostfile is None and recipe.launcher.nproc is not None:
        loop = load_rank_state(os.path.join(ckpt_dir, tag, "hexamoe_rank00000.pt")).get("loop") or {}
        if "step" in loop:
            check_resume_compatible(loop, recipe, recipe.launcher.nproc, None)
    return tag


def _try_loading(tag_dir: str) -> None:
    """Load the package's own files of a checkpoint as the ranks will (``weights_only``; FSSDP's shards
    memory-mapped, so little is read): a file that matches its manifest but does not load (a crafted pickle)
    is refused here, naming it, rather than on one rank after launch."""
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if name.startswith("hexamoe_rank") and name.endswith(".pt"):
            load_rank_state(path)
        elif name.startswith(("fssdp_rank", "zebra_rank")) and name.endswith(".pt"):
            what = "FSSDP's expert shards" if name.startswith("fssdp") else "the zebra parameters and optimizer"
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError
                raise CheckpointCorrupt(f"--resume: refusing to load {path!r}, {what} of one rank: it "
                                        f"does not load as tensors and plain values ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''}). Nothing was loaded or "
                                        "changed; restore the file from a copy, or move the checkpoint folder aside "
                                        "and pass --resume-fallback") from None


def fall_back_to_verified(ckpt_dir: str, log=print) -> str:
    """Point ``latest`` at the newest published checkpoint that verifies against its manifest, moving each
    newer one that does not aside to ``<tag>.corrupt`` (kept for inspection, never deleted). Returns the tag;
    :class:`ConfigError` listing every checkpoint's problems when none verifies."""
    tried = []
    latest = read_latest(ckpt_dir)
    if latest is None or not os.path.isdir(os.path.join(ckpt_dir, latest)):
        named = "is missing" if latest is None else f"names {latest!r}, which is no checkpoint folder"
        log(f"[ds-hexamoe] --resume-fallback: {os.path.join(ckpt_dir, 'latest')!r} {named}; looking for the newest "
            "checkpoint folder that verifies against its manifest")
    for step, tag in published_steps(ckpt_dir):
        problems = verify_checkpoint(os.path.join(ckpt_dir, tag))
        if not problems:
            for bad, _ in tried:
                aside = _free_name(os.path.join(ckpt_dir, bad + CORRUPT_SUFFIX))
                os.replace(os.path.join(ckpt_dir, bad), aside)
                log(f"[ds-hexamoe] --resume-fallback: {bad} does not verify; moved aside to {aside}")
            if tag != latest:
                atomic_write(os.path.join(ckpt_dir, "latest"), tag)
                log(f"[ds-hexamoe] --resume-fallback: resuming from {tag}, the newest checkpoint that verifies")
            return tag
        tried.append((tag, problems))
    if not tried:
        raise ConfigError(f"--resume-fallback: no checkpoint folder in {ckpt_dir!r} to resume from; run without "
                          "--resume to start training (with --overwrite where the folder holds an earlier run's outputs)")
    detail = "; ".join(f"{tag}: {problems[0]}" for tag, problems in tried)
    raise ConfigError(f"--resume-fallback: no checkpoint in {ckpt_dir!r} verifies against its manifest ({detail})")


def _free_name(path: str) -> str:
    n, out = 1, path
    while os.path.exists(out):
        n += 1
        out = f"{path}{n}"
    return out


def after_failure(output_dir: str, ckpt_dir: str, rc: int, resumed_from: str | None = None) -> str:
    """The line ``ds-hexamoe train`` prints when the job failed: which checkpoint is intact and how to go on.
    ``resumed_from``: the checkpoint this run resumed from; when no newer one was completed, the same
    ``--resume`` may fail the same way (a file of it that does not load), so that is not what it suggests."""
    latest = read_latest(ckpt_dir)
    what = f"training ended with exit code {rc} (a rank failed or was killed; its error is above)"
    if latest is None or not os.path.isdir(os.path.join(ckpt_dir, latest)):
        return f"[ds-hexamoe] {what}; no checkpoint was completed, so a new run starts from step 0"
    recipe = os.path.join(output_dir, "recipe.json")
    if resumed_from is not None and latest == resumed_from:
        return (f"[ds-hexamoe] {what}; it resumed from {os.path.join(ckpt_dir, latest)} and completed no newer "
                "checkpoint. If the error names a file of that checkpoint, restore the file from a copy, or move the "
                f"folder aside and pass --resume-fallback (`ds-hexamoe train {recipe} --resume-fallback`) to resume "
                "from the newest older checkpoint that verifies; otherwise fix the cause above before resuming")
    return (f"[ds-hexamoe] {what}; the last complete checkpoint is {os.path.join(ckpt_dir, latest)}: continue with "
            f"`ds-hexamoe train {recipe} --resume`")

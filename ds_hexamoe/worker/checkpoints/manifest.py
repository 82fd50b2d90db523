"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint, written after every rank has
finished writing and before ``latest`` names the checkpoint, and checked before a resume reads any of it
(docs/design.md, "Checkpoints you can trust").

A manifest catches bytes that changed after the save (a bad disk, a partial copy, an edited file) and
files that went missing. It does not make a checkpoint folder trustworthy: whoever can write the folder
can write a matching manifest, and DeepSpeed's own files are unpickled when loaded.
"""
from __future__ import annotations

import hashlib
import json
import os

from ...config import ConfigError
from ...atomic import atomic_write

MANIFEST = "hexamoe_manifest.json"
FORMAT = 1
_CHUNK = 1 << 22


class CheckpointCorrupt(ConfigError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def checkpoint_files(tag_dir: str) -> list[str]:
    """Every file under ``tag_dir`` (relative, sorted), except the manifest and unfinished temp files."""
    out = []
    for root, dirs, files in os.walk(tag_dir):
        dirs.sort()
        for name in files:
            if name == MANIFEST or name.startswith(".") or ".tmp-" in name:
                continue
            out.append(os.path.relpath(os.path.join(root, name), tag_dir))
    return sorted(out)


def file_digest(path: str, sync: bool = False) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file; ``sync`` also flushes it to disk (before the manifest
    that vouches for it is published)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def write_manifest(tag_dir: str, digests: dict[str, dict], meta: dict) -> str:
    """Publish the manifest of ``tag_dir`` atomically (temp file, fsync, rename); returns its path."""
    path = os.path.join(tag_dir, MANIFEST)
    atomic_write(path, json.dumps({"format": FORMAT, **meta, "files": dict(sorted(digests.items()))}, indent=1))
    return path


def read_manifest(tag_dir: str) -> dict:
    """The manifest of ``tag_dir``; :class:`CheckpointCorrupt` when it is missing or unreadable."""
    path = os.path.join(tag_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint {tag_dir!r} has no {MANIFEST}: it was not published by ds-hexamoe "
                                "train (or was written by a version before checkpoint manifests), so it cannot be "
                                "verified") from None
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"checkpoint manifest {path!r} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointCorrupt(f"checkpoint manifest {path!r} has no 'files' table")
    return manifest


def check_files(tag_dir: str, manifest: dict, names: list[str]) -> list[str]:
    """Problems with ``names`` (entries of ``manifest``) under ``tag_dir``: missing, resized or changed files."""
    problems = []
    for name in names:
        want = manifest["files"][name]
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing (the manifest lists it)")
            continue
        size = os.path.getsize(path)
        if size != want.get("size"):
            problems.append(f"{path}: {size} bytes, the manifest says {want.get('size')} (truncated or replaced)")
        elif file_digest(path)["sha256"] != want.get("sha256"):
            problems.append(f"{path}: SHA-256 differs from the manifest (its bytes changed after the save)")
    return problems


def verify_checkpoint(tag_dir: str) -> list[str]:
    """All problems of one checkpoint in this process ([] when it verifies)."""
    try:
        manifest = read_manifest(tag_dir)
    except CheckpointCorrupt as e:
        return [str(e)]
    return check_files(tag_dir, manifest, sorted(manifest["files"]))


def corrupt_message(tag_dir: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return (f"--resume: checkpoint {tag_dir!r} does not verify against its manifest: {shown}. Nothing was loaded "
            "or changed. Pass --resume-fallback to resume from the newest older checkpoint that verifies, or "
            "restore the file from a copy")

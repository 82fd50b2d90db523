"""Checkpoints of the zebra path (docs/modes.md, "Zebra", training features): each rank writes what it owns
(its fp32 masters, AdamW moments, the schedule, the loss scale) into ``zebra_rank<r>.pt`` in the checkpoint
folder, beside the loop's per-rank state file (RNG streams), under the same checksummed manifest and atomic
``latest`` as the colocated path: :class:`ZebraFiles` stands where :mod:`.checkpoints.store` expects a
DeepSpeed engine, so saving, verifying, ``--resume-fallback`` and loading are that module's."""
from __future__ import annotations

import os

import torch

from ..config import ConfigError
from .checkpoints.manifest import CheckpointCorrupt, read_manifest
from .checkpoints.store import atomic_torch_save, read_latest

FORMAT = 1
PREFIX = "zebra_rank"


def zebra_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"{PREFIX}{rank:05d}.pt")


class ZebraFiles:
    """The engine side of :func:`~.checkpoints.store.save_checkpoint` / ``load_checkpoint`` for one zebra rank:
    ``optimizer`` (:class:`~.zebra_optim.ZebraOptimizer`) holds everything this rank owns; ``split``: the
    layout as plain lists (a resume under another split is refused)."""

    def __init__(self, optimizer, rank: int, split: dict):
        self.optimizer, self.rank, self.split = optimizer, rank, split

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict, save_latest: bool = False,
                        exclude_frozen_parameters: bool = False) -> None:
        # DeepSpeed's signature; nothing here is frozen (a "peft" section is refused with zebra before launch)
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        atomic_torch_save({"format": FORMAT, "split": self.split, "state": self.optimizer.state_dict(),
                           "client": client_state}, zebra_file(ckpt_dir, tag, self.rank))

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> tuple[str, dict]:
        path = zebra_file(ckpt_dir, tag, self.rank)
        if not os.path.isfile(path):
            raise CheckpointCorrupt(f"--resume: {path!r} is missing: {tag!r} is not a zebra checkpoint of this rank "
                                    "(written by a colocated run?); resume with the run's own settings")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != FORMAT:
            raise CheckpointCorrupt(f"--resume: {path!r} is not a zebra checkpoint of format {FORMAT}")
        if data["split"] != self.split:
            raise ConfigError(f"hexamoe.zebra: the checkpoint was trained under the split {data['split']}, this run "
                              f"has {self.split}; resume with the same attention_ranks, shares and expert_owner")
        self.optimizer.load_state_dict(data["state"])
        return path, data["client"]


def check_same_world(ckpt_dir: str, world: int) -> None:
    """A zebra checkpoint resumes on its own rank count only (each rank's file is its part of the split)."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return  # the loader names the missing checkpoint
    try:
        saved = int(read_manifest(os.path.join(ckpt_dir, tag)).get("world_size", world))
    except CheckpointCorrupt:
        return  # the loader names the corrupt checkpoint, on every rank alike
    if saved != world:
        raise ConfigError(f"--resume: checkpoint {tag!r} of a zebra run was written by {saved} ranks, this run has "
                          f"{world}; a zebra checkpoint resumes under the same split (launcher.nproc = {saved})")

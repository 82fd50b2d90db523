"""Checkpoints you can trust (docs/reliability.md): DeepSpeed's files plus per-rank RNG states, a manifest
of checksums written before an atomic ``latest``, verification on every rank before a resume, the fallback
to the newest verified checkpoint, and resuming on another number of ranks.

Modules: :mod:`.store` (save, publish, verify and load), :mod:`.manifest` (checksums), :mod:`.resume`
(what the CLI checks before and says after a run), :mod:`.reshard` (a ZeRO checkpoint on a new world size).
"""
from .manifest import MANIFEST, CheckpointCorrupt, verify_checkpoint
from .resume import after_failure, check_before_resume, trim_metrics
from .store import (check_resume_compatible, load_checkpoint, loop_state, read_latest, remove_unpublished,
                    save_checkpoint)

__all__ = ["MANIFEST", "CheckpointCorrupt", "after_failure", "check_before_resume", "check_resume_compatible",
           "load_checkpoint", "loop_state", "read_latest", "remove_unpublished", "save_checkpoint", "trim_metrics",
           "verify_checkpoint"]

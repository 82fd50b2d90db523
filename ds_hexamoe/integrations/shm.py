"""DeepSpeed's CPU shared-memory all-reduce workspace: names it leaks in ``/dev/shm``, and their release.

DeepSpeed's CPU accelerator creates a ~69 MB ``/dev/shm`` file per rank at ``init_distributed`` and never
unlinks it, so every multi-rank CPU run would leak RAM (tmpfs) until reboot. The initialize path releases
the names once every rank has mapped them; an exit hook and :func:`ds_hexamoe.testing.run_distributed`
remove what a rank that died early left behind.
"""
from __future__ import annotations

import atexit
import glob
import os

import torch

from ..distributed import dist_on

SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_workspace_names(port: str | int | None = None, addr: str | None = None) -> list[str]:
    """``/dev/shm`` files of DeepSpeed's CPU shared-memory all-reduce workspace for this user, on
    ``MASTER_ADDR:MASTER_PORT`` (default: the environment's; ``port="*"`` any)."""
    addr = addr if addr is not None else os.environ.get("MASTER_ADDR", "*")
    port = port if port is not None else os.environ.get("MASTER_PORT", "*")
    return glob.glob(f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_*")


def unlink_shm_workspace(rank: str | int | None = None, port: str | int | None = None, addr: str | None = None) -> int:
    """Unlink the workspace files :func:`shm_workspace_names` finds, only ``rank``'s when given; returns
    how many went (a file another process removed first is skipped)."""
    removed = 0
    for f in shm_workspace_names(port=port, addr=addr):
        if rank is not None and f.rsplit("_", 1)[-1] != str(rank):
            continue
        try:
            os.unlink(f)
            removed += 1
        except OSError:
            pass
    return removed


def release_shm_workspace(group=None) -> int:
    """Unlink this rank's DeepSpeed CPU all-reduce workspace name (a collective; returns files removed).

    DeepSpeed's CPU accelerator creates a ~69 MB ``/dev/shm`` file per rank at ``init_distributed`` and
    never unlinks it, so every multi-rank CPU run leaks RAM (tmpfs) until reboot. Once every rank has
    mapped its peers' files (all are past ``init_distributed``: the barrier) the names can go; the
    mappings, all DeepSpeed uses, stay valid."""
    dist = torch.distributed
    if not dist_on() or dist.get_backend(group) != "gloo":
        return 0
    dist.barrier(group=group)
    return unlink_shm_workspace(rank=dist.get_rank())


@atexit.register
def _unlink_own_shm_workspace() -> None:
    """At exit, this rank's workspace name if it is still there (a path that never reached
    :func:`release_shm_workspace`, such as ``deepspeed.initialize`` without a ``hexamoe`` section); every
    peer mapped it during ``init_distributed``, long before."""
    if "RANK" in os.environ and "MASTER_PORT" in os.environ:
        unlink_shm_workspace(rank=os.environ["RANK"])

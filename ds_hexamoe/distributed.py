"""Process helpers every layer may use (no package imports): process-group queries, a host-tensor
all-reduce that works on gloo and NCCL alike, seeding, and a free loopback port."""
from __future__ import annotations

import random
import socket

import numpy as np
import torch
import torch.distributed as dist


def dist_on() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group=None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` outside a process group."""
    if not dist_on():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def host_all_reduce(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """``t`` reduced over ``group`` (``op``: SUM by default), returned on ``t``'s device; ``t`` itself outside a
    process group. NCCL reduces only CUDA tensors, so a host tensor travels through the GPU there."""
    if not dist_on():
        return t
    op = dist.ReduceOp.SUM if op is None else op
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        dev = t.cuda()
        dist.all_reduce(dev, op=op, group=group)
        return dev.to(t.device)
    dist.all_reduce(t, op=op, group=group)
    return t


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a rendezvous started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_beside(group):
    """A new process group of ``group``'s ranks, for collectives that must not queue behind (or be ordered
    against) ``group``'s; ``group`` itself unless it spans the whole job (``new_group`` needs every rank)."""
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(ranks) if len(ranks) == dist.get_world_size() else group


def failures_everywhere(error: str | None, group=None) -> list[tuple[int, str]]:
    """``[(rank, error)]`` of every rank of ``group`` whose ``error`` is not None, the same list on every rank:
    one small collective after a step that may fail on some ranks only, so that all of them stop together
    (a rank that raised alone would leave the others waiting in their next collective until its timeout)."""
    if not dist_on():
        return [] if error is None else [(0, error)]
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, error, group=group)
    return [(r, e) for r, e in enumerate(parts) if e is not None]

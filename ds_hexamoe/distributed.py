"""Small torch.distributed helpers every layer may use (no package imports)."""
from __future__ import annotations

import socket

import torch.distributed as dist


def dist_on() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group=None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` outside a process group."""
    if not dist_on():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a rendezvous started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

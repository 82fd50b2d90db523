"""Run a function on N real ``torch.distributed`` ranks (gloo) in fresh processes, with a deadline.

Used by the test suite and the CPU benchmarks. A rank that raises fails the whole call with its
traceback; a rank that hangs past ``timeout`` is killed and the call raises, so no test hangs CI.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from .distributed import free_port
from .integrations.shm import unlink_shm_workspace


def dist_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
    }


def _worker(rank, world_size, port, fn, args, kwargs, out_dir, threads, init_pg):
    os.environ.update(dist_env(rank, world_size, port))
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if init_pg:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure, including SystemExit from libraries
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if init_pg and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads: int = 1,
    init_process_group: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """``[fn(rank, world_size, *args, **kwargs) for each rank]`` run concurrently on gloo ranks.

    ``fn`` must be importable (a module-level function). With ``init_process_group=False`` the
    environment (MASTER_ADDR, RANK, ...) is set but the caller initializes, e.g. through DeepSpeed.
    """
    port = free_port()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hexamoe-dist-") as out_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, fn, args, kwargs, out_dir, threads, init_process_group),
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        # DeepSpeed never unlinks its CPU all-reduce workspace files; ranks that died before doing it leave them
        unlink_shm_workspace(port=port, addr="127.0.0.1")
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r} raised:\n{rec['error']}")
                results.append(None)
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s and were killed; " + "; ".join(errors))
        if errors:
            raise RuntimeError("\n".join(errors))
        return results

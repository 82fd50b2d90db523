"""Run a function on N real ``torch.distributed`` ranks (gloo), with a deadline: in fresh processes, or on ranks
kept alive between calls (:mod:`.pool`, what the test suite uses).

Used by the test suite and the CPU benchmarks. A rank that raises fails the whole call with its
traceback; a rank that hangs past ``timeout`` is killed and the call raises, so no test hangs CI.
Each rank's result comes back through a pipe from the process this call started, never through a file:
nothing another process could have written is ever unpickled here.

:mod:`.zebra` holds the zebra pipeline's test and benchmark models (never used by training).
"""
from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from ..distributed import free_port
from ..integrations.shm import unlink_shm_workspace
from .pool import collect_records, pool_for


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


def _worker(rank, world_size, port, fn, args, kwargs, conn, threads, init_pg):
    os.environ.update(dist_env(rank, world_size, port))
    torch.set_num_threads(threads)
    try:
        if init_pg:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        # plain pickle, not the multiprocessing one: tensors travel as bytes, not as shared-memory handles
        # that die with this process
        conn.send_bytes(pickle.dumps({"ok": True, "result": result}))
    except BaseException:  # report every failure, including SystemExit from libraries
        conn.send_bytes(pickle.dumps({"ok": False, "error": traceback.format_exc()}))
        raise
    finally:
        conn.close()
        if init_pg and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_REUSE = False  # reuse_ranks(True): calls run on pooled ranks unless they ask for fresh ones


def reuse_ranks(on: bool = True) -> None:
    """From now on run :func:`run_distributed` calls on ranks kept alive between calls (:mod:`.pool`), unless a
    call passes ``fresh=True`` or ``HEXAMOE_FRESH_RANKS=1`` is set. The test suite turns it on (conftest)."""
    global _REUSE
    _REUSE = bool(on) and os.environ.get("HEXAMOE_FRESH_RANKS", "") in ("", "0")


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads: int = 1,
    init_process_group: bool = True,
    fresh: bool | None = None,
    **kwargs: Any,
) -> list[Any]:
    """``[fn(rank, world_size, *args, **kwargs) for each rank]`` run concurrently on gloo ranks.

    ``fn`` must be importable (a module-level function). With ``init_process_group=False`` the
    environment (MASTER_ADDR, RANK, ...) is set but the caller initializes, e.g. through DeepSpeed.
    ``fresh``: new rank processes for this call (None: unless :func:`reuse_ranks` is on). Pooled ranks
    already have the default group, which ``deepspeed.init_distributed`` adopts; a caller that calls
    ``init_process_group`` itself needs ``fresh=True``.
    """
    if fresh is None:
        fresh = not _REUSE
    if fresh:
        records, hung, exitcode = _run_fresh(fn, world_size, args, kwargs, timeout, threads, init_process_group)
    else:
        pool = pool_for(world_size, threads, dist_env)
        records, hung = pool.run(fn, args, kwargs, timeout)
        exitcode = pool.exitcode
    return _results(records, hung, world_size, exitcode, timeout)


def _run_fresh(fn, world_size, args, kwargs, timeout, threads, init_pg):
    """One call on ranks started for it: ``(records, hung ranks, exitcode(rank))``."""
    port = free_port()
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, kwargs, pipes[r][1], threads, init_pg),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()  # the children hold the write ends; EOF then means a rank died
    deadline = time.monotonic() + timeout
    records, _, _ = collect_records(procs, [recv for recv, _ in pipes], deadline)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    for recv, _ in pipes:
        recv.close()
    # DeepSpeed never unlinks its CPU all-reduce workspace files; ranks that died before doing it leave them
    unlink_shm_workspace(port=port, addr="127.0.0.1")
    return records, hung, (lambda r: procs[r].exitcode)


def _results(records: dict[int, dict], hung: list[int], world_size: int, exitcode, timeout: float) -> list[Any]:
    """Every rank's result in rank order, or the error naming each rank that raised, died or hung."""
    results, errors = [], []
    for r in range(world_size):
        rec = records.get(r)
        if rec is None:
            if r not in hung:
                errors.append(f"rank {r}: no result (exit code {exitcode(r)})")
            results.append(None)
        elif rec["ok"]:
            results.append(rec["result"])
        else:
            errors.append(f"rank {r} raised:\n{rec['error']}")
            results.append(None)
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s and were killed; " + "; ".join(errors)
                           + _build_lock_hint())
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def _build_lock_hint() -> str:
    """Names DeepSpeed op build locks left on disk: ranks killed while compiling leave them, and the next
    engine then waits on them forever."""
    try:
        from ..integrations.ds_ops import stale_build_locks

        locks = stale_build_locks(stale_after_s=0)
    except Exception:  # the hint must never hide the timeout itself
        return ""
    return (f"; op build lock(s) left: {', '.join(locks)} (remove them if no build is running, then "
            "`ds-hexamoe build-ops`)") if locks else ""



def live_peak_bytes(fn: Callable[[], Any]) -> int:
    """Largest sum of tensor bytes allocated and not yet freed while ``fn`` runs (``torch.profiler`` memory
    events, allocation by allocation; tensors made before it count 0). Deterministic, unlike RSS."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak

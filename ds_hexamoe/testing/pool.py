"""Ranks kept alive between :func:`run_distributed` calls: one pool of gloo ranks per world size and thread count.

Starting ranks costs seconds (spawn, imports, the rendezvous) and a test suite starts them about a hundred
times; a pool starts each world size once. Every call still runs ``fn`` on every rank concurrently and gets
each rank's result (or traceback) through a pipe from a process this module started, never a file. What one
call may leave behind is reset before the next: environment variables, the slowdown emulation's patched
collectives, the default dtype, the thread count and the random generators (every call starts them
from the same state, whatever the previous call drew). A pool whose call failed, died or hung is killed whole and
the next call starts a fresh one, so one bad call never poisons the next.

The default process group exists before ``fn`` runs; ``deepspeed.init_distributed`` then adopts it.
``fn`` must not initialize or destroy the default group itself: such callers pass ``fresh=True``.
"""
from __future__ import annotations

import atexit
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from multiprocessing import connection as mp_connection

from ..distributed import free_port, seed_all
from ..integrations.shm import unlink_shm_workspace

_POOLS: dict[tuple[int, int], "RankPool"] = {}


@dataclass(frozen=True)
class _FreshState:
    """What a fresh rank process starts with, restored before every call."""

    env: dict[str, str]
    threads: int
    torch_seed: int  # the seed the process started with: every call draws as the first call did
    dtype: torch.dtype

    def restore(self) -> None:
        slowdown = sys.modules.get("ds_hexamoe.hetero.slowdown")
        if slowdown is not None and slowdown._ACTIVE is not None:
            slowdown._ACTIVE.uninstall()  # a call's emulated slowdown must not stretch the next call
        os.environ.clear()
        os.environ.update(self.env)
        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.dtype)
        torch.set_grad_enabled(True)
        seed_all(0)
        torch.manual_seed(self.torch_seed)


def _serve(rank: int, world_size: int, port: int, threads: int, tasks, results, env: dict[str, str]) -> None:
    """A pooled rank: join the group once, then run every task sent until the pipe closes."""
    fresh = _FreshState(dict(os.environ, **env), threads, torch.initial_seed(), torch.get_default_dtype())
    fresh.restore()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        try:
            fn, args, kwargs = pickle.loads(tasks.recv_bytes())
        except EOFError:
            break
        fresh.restore()
        try:
            record = {"ok": True, "result": fn(rank, world_size, *args, **kwargs)}
        except BaseException:  # report every failure, SystemExit from libraries included
            record = {"ok": False, "error": traceback.format_exc()}
        results.send_bytes(pickle.dumps(record))
        if not record["ok"]:
            break  # peers may wait in a collective this rank left: the driver ends the whole pool
    results.close()


def collect_records(procs, readers, deadline: float, failure_grace: float | None = None):
    """Read every rank's record as it arrives (a large one blocks its sender until read), until all ranks
    have reported or exited, or the deadline passes; ``failure_grace``: once a rank reports a failure, the
    others get that many more seconds (their own errors, not a wait for the deadline). Returns ``(records,
    ranks still waiting, whether a rank failed)``."""
    records: dict[int, dict] = {}
    waiting, failed = dict(enumerate(readers)), False
    while waiting and time.monotonic() < deadline:
        ready = mp_connection.wait(list(waiting.values()), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        for conn in ready:
            r = next(k for k, c in waiting.items() if c is conn)
            try:
                records[r] = pickle.loads(conn.recv_bytes())
            except EOFError:  # the rank died before reporting
                pass
            del waiting[r]
        for r in [r for r in waiting if not procs[r].is_alive() and not waiting[r].poll()]:
            del waiting[r]
        if failure_grace is not None and not failed and any(not rec["ok"] for rec in records.values()):
            # the failed rank has left: peers in a collective with it fail and report soon, or never
            failed, deadline = True, min(deadline, time.monotonic() + failure_grace)
    return records, list(waiting), failed


class RankPool:
    """``world_size`` gloo ranks started once (spawn), reused call after call; :meth:`close` ends them."""

    def __init__(self, world_size: int, threads: int, env_for):
        self.world_size, self.port = world_size, free_port()
        ctx = mp.get_context("spawn")
        self._tasks, self._results, self.procs = [], [], []
        for r in range(world_size):
            task_recv, task_send = ctx.Pipe(duplex=False)
            result_recv, result_send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_serve, args=(r, world_size, self.port, threads, task_recv, result_send,
                                                 env_for(r, world_size, self.port)), daemon=True)
            p.start()
            task_recv.close()
            result_send.close()  # the child holds the write end: EOF then means the rank died
            self._tasks.append(task_send)
            self._results.append(result_recv)
            self.procs.append(p)

    def run(self, fn, args, kwargs, timeout: float) -> tuple[dict[int, dict], list[int]]:
        """Every rank's record (``{"ok", "result" | "error"}``) of one call, and the ranks still running
        at the deadline. Any failure, death or hang closes the pool."""
        payload = pickle.dumps((fn, args, kwargs))
        deadline = time.monotonic() + timeout
        try:
            for conn in self._tasks:
                conn.send_bytes(payload)
        except (BrokenPipeError, OSError):
            pass  # a rank died since the last call: it reports no result below
        records, waiting, failed = collect_records(self.procs, self._results, deadline, failure_grace=FAILED_GRACE_S)
        hung = [] if failed else [r for r in waiting if self.procs[r].is_alive()]
        if len(records) < self.world_size or not all(rec["ok"] for rec in records.values()):
            self.close()
        return records, hung

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def exitcode(self, rank: int):
        return self.procs[rank].exitcode

    def close(self) -> None:
        """End every rank (politely first: closing the task pipes ends their loops), then free DeepSpeed's
        shared-memory workspace names the ranks made."""
        for conn in self._tasks:
            conn.close()
        for p in self.procs:
            p.join(2.0)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for conn in self._results:
            conn.close()
        unlink_shm_workspace(port=self.port, addr="127.0.0.1")
        for key, pool in list(_POOLS.items()):
            if pool is self:
                del _POOLS[key]


FAILED_GRACE_S = 10.0  # how long the other ranks of a failed call get to report their own errors
MAX_POOLED_RANKS = 5  # idle ranks hold a torch/DeepSpeed process's memory each: the oldest pools go first


def pool_for(world_size: int, threads: int, env_for) -> RankPool:
    """The live pool of ``world_size`` ranks with ``threads`` threads each, started on first use (pools least
    recently used are closed while more than :data:`MAX_POOLED_RANKS` ranks would be kept)."""
    key = (world_size, threads)
    pool = _POOLS.pop(key, None)
    if pool is not None and not pool.alive:
        pool.close()
        pool = None
    while _POOLS and sum(p.world_size for p in _POOLS.values()) + world_size > MAX_POOLED_RANKS:
        next(iter(_POOLS.values())).close()  # dicts keep insertion order: the least recently used first
    if pool is None:
        pool = RankPool(world_size, threads, env_for)
    _POOLS[key] = pool  # (re)inserted last: the most recently used
    return pool


@atexit.register
def close_pools() -> None:
    """No rank outlives the process that started it."""
    for pool in list(_POOLS.values()):
        pool.close()

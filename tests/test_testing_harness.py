"""``ds_hexamoe.testing.run_distributed``: results come back through pipes from the ranks it started (no
file is unpickled), large ones included; a rank that raises, dies or hangs fails the call clearly, on fresh
ranks and on pooled ones; pooled ranks are reused, start each call as a fresh process would, and a pool
whose call failed is replaced."""
from __future__ import annotations

import os
import time

import pytest
import torch

from ds_hexamoe.testing import run_distributed


def _big(rank, world, n):
    t = torch.full((n,), float(rank + 1))
    torch.distributed.all_reduce(t)
    return {"sum": t, "rank": rank, "kinds": {"set", "of", "str"}}


def _raise_on_1(rank, world):
    if rank == 1:
        raise ValueError("rank one failed on purpose")
    return rank


def _die_on_1(rank, world):
    if rank == 1:
        os._exit(3)
    return rank


def _hang_on_1(rank, world):
    if rank == 1:
        time.sleep(600)
    return rank


def test_large_and_plain_python_results_come_back():
    out = run_distributed(_big, 2, 4_000_000, timeout=120)  # 16 MB per rank: more than a pipe buffer holds
    assert [o["rank"] for o in out] == [0, 1]
    assert torch.equal(out[1]["sum"], torch.full((4_000_000,), 3.0)) and out[0]["kinds"] == {"set", "of", "str"}


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "pooled"])
def test_a_rank_that_raises_dies_or_hangs_fails_the_call(fresh):
    with pytest.raises(RuntimeError, match="rank one failed on purpose"):
        run_distributed(_raise_on_1, 2, timeout=120, init_process_group=False, fresh=fresh)
    with pytest.raises(RuntimeError, match=r"rank 1: no result \(exit code 3\)"):
        run_distributed(_die_on_1, 2, timeout=120, init_process_group=False, fresh=fresh)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] still running"):
        run_distributed(_hang_on_1, 2, timeout=10, init_process_group=False, fresh=fresh)
    assert time.monotonic() - t0 < 60
    assert run_distributed(_big, 2, 8, fresh=fresh)[1]["rank"] == 1  # a failed pool is replaced


def _leave_traces(rank, world):
    """What a call may leave in its process, and what a later call must not see."""
    from ds_hexamoe.hetero.slowdown import CollectiveClock

    before = torch.distributed.all_reduce
    os.environ["HEXAMOE_LEFT_BEHIND"] = "1"
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(123)
    CollectiveClock(slowdown=1.0 + rank).install()  # the emulation patches torch.distributed's collectives
    return {"pid": os.getpid(), "patched": torch.distributed.all_reduce is not before}


def _observe(rank, world):
    import ds_hexamoe.hetero.slowdown as slowdown

    return {"pid": os.getpid(), "env": os.environ.get("HEXAMOE_LEFT_BEHIND"), "dtype": torch.get_default_dtype(),
            "draw": torch.rand(3), "clock": slowdown._ACTIVE, "rank_env": os.environ["RANK"]}


def test_pooled_ranks_are_reused_and_start_each_call_alike():
    before = run_distributed(_observe, 2, fresh=False)
    first = run_distributed(_leave_traces, 2, fresh=False)
    later = run_distributed(_observe, 2, fresh=False)
    assert all(o["patched"] for o in first)
    assert [o["pid"] for o in later] == [o["pid"] for o in first] == [o["pid"] for o in before]  # same processes
    for b, o in zip(before, later):
        assert o["env"] is None and o["dtype"] == torch.float32 and o["clock"] is None
        assert torch.equal(o["draw"], b["draw"])  # the generator restarts from the same state every call
    assert [o["rank_env"] for o in later] == ["0", "1"]

"""``ds_hexamoe.testing.run_distributed``: results come back through pipes from the ranks it started (no
file is unpickled), large ones included; a rank that raises, dies or hangs fails the call clearly."""
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


def test_a_rank_that_raises_dies_or_hangs_fails_the_call():
    with pytest.raises(RuntimeError, match="rank one failed on purpose"):
        run_distributed(_raise_on_1, 2, timeout=120, init_process_group=False)
    with pytest.raises(RuntimeError, match=r"rank 1: no result \(exit code 3\)"):
        run_distributed(_die_on_1, 2, timeout=120, init_process_group=False)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] still running"):
        run_distributed(_hang_on_1, 2, timeout=10, init_process_group=False)
    assert time.monotonic() - t0 < 60

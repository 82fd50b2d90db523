"""The ``"hecate"`` mode across a checkpoint: ownership re-owned by load before the save, a resume on the same
4 ranks equal to the uninterrupted run, and a 4 -> 2 rank resume with experts and their optimizer state
re-sharded by expert id."""
from __future__ import annotations

import pytest

from ds_hexamoe.testing import run_distributed
from test_fssdp import max_diff
from test_fssdp_checkpoint import _resume_elsewhere_worker, _save_and_resume_worker, check_resharded

# layer 0's routing moves from expert 1 to expert 3 at step 2, re-ownership every 2 steps: the checkpoint at
# step 3 holds a load-aware (non-contiguous) ownership and the window that decides the next placement
CASE = dict(world=4, experts=8, top_k=2, micro=1, gas=2, global_rows=4, lr=3e-3, clip=0.3, steps=5,
            remat=True, prefetch=True, mode="hecate", budget=2, reshard_every=2,
            routing={0: ("switch", 1, 6, 2)})


def test_hecate_mode_resumes_after_reownership_on_same_and_fewer_ranks(tmp_path):
    ckpt, export = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    four = run_distributed(_save_and_resume_worker, 4, CASE, ckpt, init_process_group=False, timeout=500)
    r0 = four[0]
    contiguous = tuple(tuple(range(2 * r, 2 * r + 2)) for r in range(4))
    assert any(tuple(map(tuple, own)) != contiguous for own in r0["own_saved"]), r0["own_saved"]
    # the resumed ranks own what the saved ranks owned (the checkpoint carries the re-ownership)
    assert r0["own_loaded"] == r0["own_saved"]
    assert r0["resumed"]["loss"] == pytest.approx(r0["cont"]["loss"], rel=1e-6)
    assert max_diff(r0["final"], r0["final2"])[0] < 1e-6

    case2 = dict(CASE, world=2, micro=2)
    two = run_distributed(_resume_elsewhere_worker, 2, case2, ckpt, export, init_process_group=False, timeout=500)
    check_resharded(four, two)

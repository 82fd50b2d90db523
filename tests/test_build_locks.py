"""A DeepSpeed op build killed half-way leaves a lock on which every later engine waits forever: the
package names it before any work (a test that hung for 240 s on a fresh machine before this existed)."""
from __future__ import annotations

import os
import time

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import ds_hexamoe
from ds_hexamoe.integrations import ds_ops
from ds_hexamoe.testing import _build_lock_hint


def _dead_build(root, name: str, age_s: float) -> str:
    """A build directory like the one a killed compile leaves: a lock and a half-written object."""
    d = ds_ops.build_dir(name)
    assert d.startswith(str(root)), d
    os.makedirs(d, exist_ok=True)
    then = time.time() - age_s
    for f in ("lock", "build.ninja", "half.o"):
        path = os.path.join(d, f)
        open(path, "w").close()
        os.utime(path, (then, then))
    return os.path.join(d, "lock")


@pytest.fixture
def ext_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_a_lock_no_build_touched_for_long_is_stale(ext_root):
    lock = _dead_build(ext_root, "fused_adam", ds_ops.STALE_AFTER_S + 60)
    assert ds_ops.stale_build_locks(["fused_adam", "deepspeed_shm_comm"]) == [lock]


def test_a_build_in_progress_is_left_alone(ext_root):
    _dead_build(ext_root, "fused_adam", 5)  # written seconds ago: a compile still running
    assert ds_ops.stale_build_locks(["fused_adam"]) == []
    ds_ops.check_build_locks(["fused_adam"])
    assert "fused_adam" in _build_lock_hint()  # a timed-out test still names it, as a possible cause


def test_initialize_names_the_stale_lock_before_any_work(ext_root):
    lock = _dead_build(ext_root, "fused_adam", ds_ops.STALE_AFTER_S + 60)
    model = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                             vocab_size=64))
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
              "hexamoe": {"enabled": True}}
    with pytest.raises(ds_ops.StaleBuildLock, match="remove the lock") as err:
        ds_hexamoe.initialize(model=model, config=config)
    assert lock in str(err.value)
    assert model.config._experts_implementation != "hexamoe"  # nothing converted
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])

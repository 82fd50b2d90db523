"""Issue 24, checkpoints and outputs: files written with the umask's permissions, one export line, a plain
run that never overwrites an earlier run, --resume-fallback past a damaged 'latest', a failed shard load that
ends every rank naming the file, a full disk during the export, and a schedule kept on an extended resume."""
from __future__ import annotations

import os
import stat

import pytest

from ds_hexamoe.atomic import atomic_save_dir, atomic_write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_writes_get_the_permissions_the_umask_gives(tmp_path, umask_027):
    f = str(tmp_path / "a.json")
    atomic_write(f, "{}")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            fh.write("{}")

    d = str(tmp_path / "hf")
    atomic_save_dir(write, d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(os.path.join(d, "config.json")).st_mode) == 0o640


def test_the_export_is_printed_once(capsys):
    from types import SimpleNamespace

    from ds_hexamoe.worker import loop

    report = {"batch_shares": [3, 1], "shard_weights": [0.75, 0.25], "slowdowns": [1.0, 2.0],
              "predicted_step_s": 0.1, "predicted_uniform_step_s": 0.2, "measured_step_s": 0.11,
              "measured_steps": [3, 8], "calibration": None, "expert_bytes_per_step": 1000.0,
              "replicated_expert_bytes_per_step": 2000.0, "hf_export": "/out/hf"}
    run = SimpleNamespace(recipe=SimpleNamespace(name="t", training=SimpleNamespace(steps=8)), last_eval={},
                          strategy=SimpleNamespace(header_lines=lambda: []))
    summary = {"first_loss": 5.0, "last_loss": 4.0, "world_size": 2, "checkpoint": "/out/checkpoints/global_step8",
               "hf_export": "/out/hf", "report": report}
    loop._print_outcome(run, summary, 0, {"train_s": 1.0, "setup_s": 1.0})
    said = capsys.readouterr().out
    assert said.count("/out/hf") == 1 and "export (from_pretrained loads it): /out/hf" in said, said
    assert "plan: batch shares [3, 1]" in said

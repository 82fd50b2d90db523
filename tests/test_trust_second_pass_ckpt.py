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

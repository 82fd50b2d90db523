"""Atomic file and directory writes: a reader (another rank, a resumed run) sees the old content or the new,
never half of it, and a failed write leaves nothing behind (no package imports). What is written gets the
permissions the umask gives, as ``open`` and ``mkdir`` would (``mkstemp``/``mkdtemp`` alone make it private)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO


def umask() -> int:
    """This process's umask, read without changing it where Linux tells it (``os.umask`` sets it to read it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_with(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, fsync it, then rename it onto ``path``; on any
    failure the temp file is removed and ``path`` is untouched."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (:func:`atomic_write_with`)."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda fh: fh.write(payload))


def atomic_save_dir(write: Callable[[str], object], final: str) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` onto ``final`` (an old ``final`` is replaced whole)."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~umask())
        write(tmp)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

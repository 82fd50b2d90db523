"""DeepSpeed's just-in-time C++ ops (Adam, shared-memory collectives): built once ahead, stale locks named.

DeepSpeed compiles these ops the first time an engine needs them, under a lock file in torch's
extension directory. A build killed half-way (a timeout, Ctrl-C, an out-of-memory kill) leaves that
lock behind, and every later engine waits on it forever without a word. ``scripts/setup.sh`` builds
the ops ahead (``ds-hexamoe build-ops``), so no training job or test compiles under
its own timeout; :func:`check_build_locks` runs before ``ds_hexamoe.initialize`` does any work and
names a lock no build has touched for ``STALE_AFTER_S``, with the fix.
"""
from __future__ import annotations

import os
import time

# the ops a CPU or CUDA engine of this package loads by default (FusedAdam; shm all-reduce on CPU)
OPS = ("FusedAdamBuilder", "ShareMemCommBuilder")
STALE_AFTER_S = 30 * 60  # a live build writes an object file at least this often, even on a loaded box


class StaleBuildLock(RuntimeError):
    """A torch extension build lock that no build holds any more."""


def _builders(names=OPS):
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for name in names:
        try:
            builder = acc.create_op_builder(name)
        except (AttributeError, ValueError, ImportError):
            builder = None
        if builder is not None and builder.is_compatible(verbose=False):
            yield builder


def build_dir(op_name: str) -> str:
    """torch's build directory for an extension named ``op_name`` (honours ``TORCH_EXTENSIONS_DIR``)."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(op_name, verbose=False)


def stale_build_locks(op_names=None, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Lock files of extension builds (default: :data:`OPS`) whose directory nothing wrote to for
    ``stale_after_s`` seconds: a build that died, not one in progress."""
    if op_names is None:
        op_names = [b.name for b in _builders()]
    now = time.time() if now is None else now
    stale = []
    for name in op_names:
        d = build_dir(name)
        lock = os.path.join(d, "lock")
        if not os.path.exists(lock):
            continue
        newest = max(os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d))
        if now - newest > stale_after_s:
            stale.append(lock)
    return stale


def check_build_locks(op_names=None) -> None:
    """Raise :class:`StaleBuildLock` naming every stale lock (see :func:`stale_build_locks`)."""
    stale = stale_build_locks(op_names)
    if stale:
        raise StaleBuildLock(
            "a DeepSpeed op build was killed half-way and left its lock, on which every engine would wait "
            f"forever: {', '.join(stale)}. No build has written there for {STALE_AFTER_S // 60} minutes; if no "
            "other job is compiling, remove the lock file(s) and rebuild with "
            "`ds-hexamoe build-ops`")


def prebuild(names=OPS) -> list[str]:
    """Build (or load the cached build of) each op DeepSpeed will need here; returns their names."""
    built = []
    for builder in _builders(names):
        check_build_locks([builder.name])
        builder.load(verbose=False)
        built.append(builder.name)
    return built


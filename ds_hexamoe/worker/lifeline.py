"""A worker ends when the job that started it is gone (docs/reliability.md, "Signals and orphans").

Two mechanisms, both armed by :func:`arm` at worker start:

- ``PR_SET_PDEATHSIG`` (Linux, through ``ctypes``): the kernel sends SIGTERM to the worker when its
  parent, DeepSpeed's per-node launcher, dies.
- a daemon thread polling the ``ds-hexamoe`` process named by ``HEXAMOE_PARENT`` (``pid:pgid:host``,
  set by ``ds-hexamoe train``): when it is gone (a SIGKILL cannot be forwarded), the worker ends the
  job's whole process group (SIGKILL; when it is in one of its own) and exits.

Neither runs outside ``ds-hexamoe train`` (no ``HEXAMOE_PARENT``), nor on another host than the
``ds-hexamoe`` process.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

PARENT_ENV = "HEXAMOE_PARENT"  # same name as ds_hexamoe.cli.jobs.PARENT_ENV (cli sits above the worker)
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _end_job(parent_pgid: int) -> None:
    msg = "[ds-hexamoe] worker: the ds-hexamoe process is gone; ending the job\n"
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())
    group = os.getpgrp()
    if group != parent_pgid:
        # the job's own group (ds-hexamoe starts it in a new session): nothing in it can save anything
        # useful without ds-hexamoe, so end it at once, this worker included
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    os._exit(143)


def _watch(pid: int, pgid: int, poll_s: float) -> None:
    while _alive(pid):
        time.sleep(poll_s)
    _end_job(pgid)


def parse_parent(value: str | None) -> tuple[int, int] | None:
    """``(pid, pgid)`` from ``HEXAMOE_PARENT`` when it names a process on this host, else None."""
    if not value:
        return None
    try:
        pid, pgid, host = value.split(":", 2)
        if host != socket.gethostname():
            return None
        return int(pid), int(pgid)
    except ValueError:
        return None


def arm(poll_s: float = POLL_S) -> bool:
    """Arm both mechanisms when started by ``ds-hexamoe train``; returns whether the watchdog runs."""
    parent = parse_parent(os.environ.get(PARENT_ENV))
    if parent is None:
        return False
    _set_parent_death_signal()
    threading.Thread(target=_watch, args=(*parent, poll_s), name="hexamoe-lifeline", daemon=True).start()
    return True

"""The file DeepSpeed's launcher runs on every rank: ``deepspeed ... ds_hexamoe/train.py --recipe R``.

Run by file path, never with ``-m``: a launcher that puts the repository root on ``sys.path`` would let
its ``kernels/`` folder shadow Hugging Face's ``kernels`` package, so such entries are dropped before
anything else is imported. The worker itself is :mod:`ds_hexamoe.worker` (docs/design.md, "Recipes,
tasks, worker and CLI").
"""
from __future__ import annotations

import os
import sys


def _sanitize_sys_path() -> None:
    """Drop this file's folder and the repository root from ``sys.path`` (see the module docstring)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    bad = {here}
    if os.path.isdir(os.path.join(root, "kernels")) and os.path.isfile(os.path.join(root, "setup.py")):
        bad.add(root)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) not in bad]


if __name__ == "__main__":
    _sanitize_sys_path()
    from ds_hexamoe.worker import main

    sys.exit(main())

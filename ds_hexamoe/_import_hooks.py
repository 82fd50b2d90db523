"""Run a callback right after a third-party module is first imported.

``import ds_hexamoe`` must stay light (every spawned rank pays for it), yet it promises that transformers
knows ``experts_implementation="hexamoe"`` and that ``deepspeed.initialize`` honours the ``"hexamoe"``
section. Both are installed the moment those modules load, or at once if they already have.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable

_PENDING: dict[str, list[Callable]] = {}


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            # callbacks leave the queue only on a real import: find_spec alone is also used to probe
            for cb in _PENDING.pop(fullname, []):
                cb(module)

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _AfterImportFinder()


def when_imported(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    _PENDING.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)

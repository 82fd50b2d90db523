"""Recipe paths: ``pkg://PACKAGE/REL/PATH`` names a file shipped inside an installed package, a relative path
is relative to the recipe file's folder, and ``/path/to/...`` marks a placeholder the user must fill in
(docs/design.md, "Recipes, tasks, worker and CLI")."""
from __future__ import annotations

import importlib.resources
import os

from ..config import ConfigError

PKG_PREFIX = "pkg://"
PLACEHOLDER_PREFIX = "/path/to/"


def resolve_path(path: str, base_dir: str | None) -> str:
    """An absolute path: ``pkg://`` paths inside the installed package, relative ones under ``base_dir``."""
    if path.startswith(PKG_PREFIX):
        package, _, rel = path[len(PKG_PREFIX):].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise ConfigError(f"{path!r}: package {package!r} is not installed") from None
        return os.path.join(str(root), *rel.split("/")) if rel else str(root)
    path = os.path.expanduser(path)
    if os.path.isabs(path) or base_dir is None:
        return os.path.abspath(path)
    return os.path.abspath(os.path.join(base_dir, path))


def is_placeholder(path: str) -> bool:
    return path.startswith(PLACEHOLDER_PREFIX)

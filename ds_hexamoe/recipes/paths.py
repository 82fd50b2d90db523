"""Recipe paths: ``pkg://PACKAGE/REL/PATH`` names a file shipped inside ds_hexamoe or an installed
distribution (found from metadata, never by import), a relative path
is relative to the recipe file's folder, and ``/path/to/...`` marks a placeholder the user must fill in
(docs/design.md, "Recipes, tasks, worker and CLI")."""
from __future__ import annotations

import importlib.metadata
import os

from ..config import ConfigError

PKG_PREFIX = "pkg://"
PLACEHOLDER_PREFIX = "/path/to/"


def resolve_path(path: str, base_dir: str | None) -> str:
    """An absolute path: ``pkg://`` paths inside the installed package, relative ones under ``base_dir``."""
    if path.startswith(PKG_PREFIX):
        package, _, rel = path[len(PKG_PREFIX):].partition("/")
        root = package_folder(package, path)
        return os.path.join(root, *rel.split("/")) if rel else root
    path = os.path.expanduser(path)
    if os.path.isabs(path) or base_dir is None:
        return os.path.abspath(path)
    return os.path.abspath(os.path.join(base_dir, path))


def package_folder(package: str, path: str) -> str:
    """Where ``package`` (dotted) lies: this package's own folder, or a folder an installed distribution's
    metadata lists. Nothing is imported: finding a module by import would run it (and a parent package's
    ``__init__``), and a module in the working directory would be code the recipe runs."""
    parts = package.split(".")
    own = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if parts[0] == os.path.basename(own):
        return os.path.join(own, *parts[1:])
    for dist in importlib.metadata.packages_distributions().get(parts[0], []):
        folder = importlib.metadata.distribution(dist).locate_file(os.path.join(*parts))
        if os.path.isdir(folder):
            return os.fspath(folder)
    raise ConfigError(f"{path!r}: {package!r} is not ds_hexamoe nor a package of an installed distribution; "
                      "pkg:// names files shipped inside an installed package (pkg://ds_hexamoe/data/...), for "
                      "anything else give a file path")


def is_placeholder(path: str) -> bool:
    return path.startswith(PLACEHOLDER_PREFIX)


def placeholders(value, key: str = "") -> list[tuple[str, str]]:
    """(dotted key, path) of every placeholder in a recipe's dict (:meth:`Recipe.to_dict`), in key order."""
    if isinstance(value, str):
        return [(key, value)] if is_placeholder(value) else []
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in placeholders(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in placeholders(v, f"{key}[{i}]")]
    return []

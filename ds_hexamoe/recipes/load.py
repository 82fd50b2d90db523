"""Loading a recipe: read the JSON (or the embedded default), apply dotted-key overrides, validate every
key, resolve paths, parse the ``"hexamoe"`` section and check every input file (docs/design.md,
"Recipes, tasks, worker and CLI").

Input paths are relative to the recipe file's folder; ``pkg://PACKAGE/REL/PATH`` names a file shipped
inside ds_hexamoe or an installed distribution, found without importing anything (the embedded default uses
``pkg://ds_hexamoe/data/...``). The training ``output_dir`` is relative to the working directory, like every
other trainer's. Independent errors are collected and raised together (:class:`~ds_hexamoe.config.Collector`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import typing
from typing import Any

from ..config import Collector, ConfigError, HexaMoEConfig, _coerce
from ..jsonfile import read_json
from .checks import check_peft, check_router_section, check_task
from .logging_spec import check_generate
from .ds_config import check_ds_config
from .files import check_recipe_files
from .paths import is_placeholder, resolve_path
from .schema import Recipe

# the embedded default: fine-tune the shipped checkpoint with FSSDP on a declared heterogeneous pair
DEFAULT_RECIPE = "pkg://ds_hexamoe/data/recipes/mixtral-tiny-finetune.json"


def _recipe_from_dict(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {where}: got {type(data).__name__}; expected a JSON object")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Recipe)
    found = Collector()
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.add(ConfigError(f"{key}: unknown recipe key{hint}; allowed keys are {sorted(fields)}"))
        elif key == "deepspeed":
            kwargs[key] = value
        else:
            kwargs[key] = found.run(_coerce, hints[key], value, key)
    found.raise_all()  # the recipe-wide checks below read several sections
    recipe = Recipe(**kwargs)
    recipe.validate()
    return recipe


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        nxt = node[p]
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a JSON object in this recipe")
        node = nxt
    node[parts[-1]] = value


def load_recipe(
    path: str | os.PathLike | dict | None = None,
    overrides: dict[str, Any] | None = None,
    check_files: bool = True,
    check_data: bool = True,
) -> Recipe:
    """Parse, resolve and validate a recipe (``None``: the embedded default).

    ``overrides`` maps dotted keys (``"training.steps"``) to values, applied before validation, so they
    are checked like the file's own values. With ``check_files`` every input path must exist; without
    ``check_data`` the data files are not read (``ds-hexamoe plan`` sizes clusters the data may not fill).
    """
    if isinstance(path, dict):
        data, source, base_dir = copy.deepcopy(path), None, os.getcwd()
        where = "(inline)"
    else:
        spec = os.fspath(path) if path is not None else DEFAULT_RECIPE
        source = resolve_path(spec, os.getcwd())
        where = spec
        data = read_json(source, "recipe", "pass a recipe JSON file (or none for the embedded default)")
        base_dir = os.path.dirname(source)
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {where}: got {type(data).__name__}; expected a JSON object")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    recipe = _recipe_from_dict(data, where)
    check_task(recipe)  # before anything is imported or read: an untrusted task import stops here
    recipe.source, recipe.base_dir = source, base_dir
    found = Collector()
    _resolve_paths(recipe, found)
    found.raise_all()  # every later check reads the resolved paths
    recipe.hexamoe_config = found.run(_validate_hexamoe, recipe)
    found.run(check_router_section, recipe)
    found.run(check_generate, recipe)
    found.run(check_peft, recipe)
    if check_files:
        found.run(check_recipe_files, recipe, check_data)
    found.run(check_ds_config, recipe)
    found.raise_all()
    return recipe


def _resolve_paths(r: Recipe, found: Collector) -> None:
    base = r.base_dir

    def keep(p: str) -> str:  # a placeholder stays (the file checks name it); a bad pkg:// path is collected
        return p if is_placeholder(p) else (found.run(resolve_path, p, base) or p)

    if r.model.path is not None:
        r.model.path = keep(r.model.path)
    if r.tokenizer is not None and r.tokenizer.path is not None:
        r.tokenizer.path = keep(r.tokenizer.path)
    r.data.train_files = [keep(p) for p in r.data.train_files]
    if r.data.validation_files:
        r.data.validation_files = [keep(p) for p in r.data.validation_files]
    if r.data.cache_dir is not None:
        r.data.cache_dir = keep(r.data.cache_dir)
    if isinstance(r.deepspeed, str):
        r.deepspeed = keep(r.deepspeed)
    if r.launcher.hostfile is not None:
        r.launcher.hostfile = keep(r.launcher.hostfile)
    # outputs live under the working directory, never inside an installed package
    r.training.output_dir = os.path.abspath(os.path.expanduser(r.training.output_dir))
    if r.hexamoe:
        for key in ("devices_file", "stats_path"):
            if isinstance(r.hexamoe.get(key), str):
                r.hexamoe[key] = keep(r.hexamoe[key])


def _validate_hexamoe(r: Recipe) -> HexaMoEConfig | None:
    section = r.hexamoe
    if section is None:
        inline = r.deepspeed if isinstance(r.deepspeed, dict) else None
        section = inline.get("hexamoe") if inline else None
    if section is None:
        return None
    return HexaMoEConfig.from_dict(section, "hexamoe")


def recipe_json(recipe: Recipe) -> str:
    """The resolved recipe as JSON (paths absolute, overrides applied), as saved next to a run."""
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=False)

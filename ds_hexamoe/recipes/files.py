"""Every input path a recipe names, checked before anything is launched: the model and tokenizer
folders, the DeepSpeed file, the hostfile, and the data files (glob patterns expanded, the format told
from the extensions, the text field found in the first record) (docs/design.md, "Recipes, tasks, worker
and CLI")."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from ..config import Collector, ConfigError
from ..jsonfile import read_json
from .checks import (check_against_world, check_experts_topk, check_output_dir, check_text_data, check_weights,
                     check_zebra)
from .instruct import INSTRUCT_FORMATS, check_instruct_data
from .paths import is_placeholder
from .schema import CAUSAL_LM, Recipe, check_positions

_EXT_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def expand_patterns(patterns: list[str], key: str) -> list[str]:
    """Sorted, de-duplicated files matched by ``patterns``; a pattern that matches nothing is an error."""
    files: list[str] = []
    for i, pat in enumerate(patterns):
        if is_placeholder(pat):
            raise ConfigError(f"{key}[{i}]: {pat!r} is a placeholder; fill in your local data files or glob pattern "
                              "(text/json/jsonl/csv/parquet)")
        hits = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        if not hits:
            what = "file does not exist" if not glob.has_magic(pat) else "pattern matches no files"
            raise ConfigError(f"{key}[{i}]: {what}: {pat!r}; give existing local data files "
                              "(relative paths are resolved from the recipe's folder)")
        files.extend(h for h in hits if h not in files)
    return files


def infer_format(files: list[str], declared: str, key: str) -> str:
    """The ``datasets`` builder for ``files``: ``declared`` unless "auto", else from the extensions."""
    if declared != "auto":
        return declared
    found = {}
    for f in files:
        name = f
        for c in _COMPRESSION:
            if name.endswith(c):
                name = name[: -len(c)]
        ext = os.path.splitext(name)[1].lower()
        if ext not in _EXT_FORMATS:
            raise ConfigError(f"{key}: cannot tell the format of {f!r} from its extension; set data.format to one "
                              f"of ['text', 'json', 'csv', 'parquet'] (known extensions: {sorted(_EXT_FORMATS)})")
        found.setdefault(_EXT_FORMATS[ext], f)
    if len(found) > 1:
        raise ConfigError(f"{key}: files of several formats {sorted(found)} (e.g. {list(found.values())}); "
                          "give files of one format or set data.format")
    return next(iter(found))


def _peek_columns(path: str, fmt: str) -> list[str] | None:
    """Column names of the first record, read cheaply; None when it cannot be told without a full load."""
    if path.endswith(_COMPRESSION):
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if fmt == "csv":
        import csv

        with open(path, newline="") as fh:
            return next(csv.reader(fh), [])
    if fmt == "json":
        with open(path) as fh:
            head = fh.read(1 << 16).lstrip()
        if not head or head[0] == "[":
            return None  # a JSON array or a "data" field: datasets decides
        line = head.splitlines()[0]
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return None  # one pretty-printed object: datasets decides
        return list(rec) if isinstance(rec, dict) else None
    return None


@dataclass
class DataFiles:
    """The expanded training and validation files of a recipe and their ``datasets`` format."""

    train: list[str]
    validation: list[str] | None
    format: str


def resolve_data_files(recipe: Recipe) -> DataFiles:
    """Expand the recipe's data patterns; missing files and mixed formats are errors."""
    d = recipe.data
    train = expand_patterns(d.train_files, "data.train_files")
    val = expand_patterns(d.validation_files, "data.validation_files") if d.validation_files else None
    # instruction records are read by the builder of their files' extensions
    fmt = infer_format(train + (val or []), "auto" if d.format in INSTRUCT_FORMATS else d.format, "data.train_files")
    return DataFiles(train, val, fmt)


def check_data_files(recipe: Recipe) -> DataFiles:
    """:func:`resolve_data_files` plus a cheap check that the text field exists in the first record."""
    files = resolve_data_files(recipe)
    check_text_data(recipe, files.train, "data.train_files", files.format)
    if files.validation:
        check_text_data(recipe, files.validation, "data.validation_files", files.format)
    if files.format != "text" and recipe.data.format not in INSTRUCT_FORMATS:
        for f in [files.train[0]] + (files.validation[:1] if files.validation else []):
            cols = _peek_columns(f, files.format)
            if cols is not None and recipe.data.text_field not in cols:
                raise ConfigError(f"data.text_field: {recipe.data.text_field!r} is not a field of {f!r}; its fields are "
                                  f"{cols}")
    check_instruct_data(recipe, files)
    return files


def _check_checkpoint_dir(path: str, key: str, what: str) -> None:
    if is_placeholder(path):
        raise ConfigError(
            f"{key}: {path!r} is a placeholder; fill in the local folder of the downloaded {what} "
            "(this recipe does not download anything)")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: folder {path!r} does not exist; give a local {what} folder")


def check_recipe_files(r: Recipe, check_data: bool = True) -> None:
    """Every input the recipe names must exist and make sense (raised before anything is launched); independent
    inputs are all checked, and every error found is raised at once. ``check_data``: read the data files too."""
    found = Collector()
    found.run(check_output_dir, r)
    if r.model.path is not None:
        found.run(_check_model, r)
    if r.task == CAUSAL_LM:
        found.run(_check_tokenizer, r)
        if check_data:
            found.run(check_data_files, r)
    elif r.data.train_files and check_data:
        found.run(expand_patterns, r.data.train_files, "data.train_files")
    if isinstance(r.deepspeed, str) and not os.path.isfile(r.deepspeed):
        found.add(ConfigError(f"deepspeed: file {r.deepspeed!r} does not exist; give an existing DeepSpeed JSON "
                              "file (relative to the recipe's folder) or an inline JSON object"))
    if r.launcher.hostfile is not None and not os.path.isfile(r.launcher.hostfile):
        found.add(ConfigError(f"launcher.hostfile: file {r.launcher.hostfile!r} does not exist; give a DeepSpeed "
                              "hostfile ('host slots=N' per line) or leave it null for a single node"))
    if r.task == CAUSAL_LM and r.model.path is None:
        found.run(check_experts_topk, r)  # a checkpoint's config is checked with the checkpoint
    found.run(check_against_world, r)
    found.run(check_zebra, r)
    found.raise_all()


def _check_model(r: Recipe) -> None:
    _check_checkpoint_dir(r.model.path, "model.path", "Hugging Face checkpoint (config.json + weights)")
    config = os.path.join(r.model.path, "config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"model.path: {r.model.path!r} has no config.json; give a Hugging Face checkpoint folder")
    if r.task == CAUSAL_LM:
        if "max_position_embeddings" not in (r.model.config or {}):
            cfg = read_json(config, "model.path", "give a Hugging Face checkpoint folder")
            check_positions(r.data.seq_len, cfg.get("max_position_embeddings"), config)
        check_experts_topk(r)
    check_weights(r)


def _check_tokenizer(r: Recipe) -> None:
    tok = r.tokenizer_spec
    if tok.path is None and tok.build is None:
        raise ConfigError('tokenizer: a model built from "config" needs a tokenizer: set "tokenizer.path" to a '
                          'local tokenizer folder or "tokenizer.build" to train one on the data')
    if tok.path is not None:
        _check_checkpoint_dir(tok.path, "tokenizer.path", "tokenizer")
        if not any(os.path.isfile(os.path.join(tok.path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
            raise ConfigError(f"tokenizer.path: {tok.path!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")

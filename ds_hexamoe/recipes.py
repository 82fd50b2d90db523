"""Training recipes: one JSON file naming the model, tokenizer, data, training settings, the DeepSpeed
config, the ``"hexamoe"`` section and the launcher, as typed dataclasses validated before any work.

Every key is checked the way :mod:`ds_hexamoe.config` checks the ``"hexamoe"`` section: an unknown key
or a bad value raises :class:`~ds_hexamoe.config.ConfigError` naming the dotted key and what is
allowed. Paths are checked too (model checkpoint, tokenizer, data files, DeepSpeed config, hostfile),
so a recipe that validates only fails later for reasons a file cannot show.

Input paths are relative to the recipe file's folder; ``pkg://PACKAGE/REL/PATH`` names a file shipped
inside an installed package (the embedded default uses ``pkg://ds_hexamoe/data/...``). The training
``output_dir`` is relative to the working directory, like every other trainer's.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import importlib
import importlib.resources
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import ConfigError, HexaMoEConfig, _check, _coerce, read_json

PKG_PREFIX = "pkg://"
DEFAULT_RECIPE = "pkg://ds_hexamoe/data/recipes/mixtral-tiny.json"
PLACEHOLDER_PREFIX = "/path/to/"

# Training tasks: name -> "module:function" building a :class:`ds_hexamoe.train.TaskParts`. A recipe
# may also name any importable "package.module:function" directly in its "task" key.
TASKS: dict[str, str] = {
    "causal-lm": "ds_hexamoe.train:causal_lm_task",
    "image-classification": "ds_hexamoe.data_images:image_classification_task",
}
CAUSAL_LM = "causal-lm"

# Keys the recipe sets in the DeepSpeed config; a DeepSpeed config that sets them differently is an error.
_DS_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_DTYPES = ("fp32", "bf16", "fp16")


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


def _is_placeholder(path: str) -> bool:
    return path.startswith(PLACEHOLDER_PREFIX)


@dataclass
class ModelSpec:
    """``path``: a local Hugging Face checkpoint folder; ``config``: a transformers config dict (with
    ``model_type``) to initialize a fresh model from, or, next to ``path``, overrides of its config."""

    path: str | None = None
    config: dict | None = None
    experts_implementation: Literal["hexamoe", "grouped_mm", "eager"] = "hexamoe"
    trust_remote_code: bool = False

    def validate(self, path: str) -> None:
        _check(self.config is None or isinstance(self.config, dict), f"{path}.config", self.config,
               "a JSON object of transformers config fields")
        _check(self.path is not None or self.config is not None, path, None,
               'a "path" to a local Hugging Face checkpoint or a "config" with a "model_type"')


@dataclass
class TokenizerBuildSpec:
    """Train a byte-level BPE tokenizer on the training files (saved as a ``PreTrainedTokenizerFast``)."""

    vocab_size: int = 512
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"

    def validate(self, path: str) -> None:
        # byte-level BPE starts from 256 byte symbols plus the special tokens
        _check(self.vocab_size >= 260, f"{path}.vocab_size", self.vocab_size, "an integer >= 260 (256 bytes + specials)")
        _check(self.min_frequency >= 1, f"{path}.min_frequency", self.min_frequency, "an integer >= 1")
        _check(self.eos_token != self.pad_token, f"{path}.pad_token", self.pad_token, "a token different from eos_token")


@dataclass
class TokenizerSpec:
    """A local tokenizer folder (``path``) or a tokenizer to train (``build``); omitted: ``model.path``."""

    path: str | None = None
    build: TokenizerBuildSpec | None = None

    def validate(self, path: str) -> None:
        _check(not (self.path is not None and self.build is not None), path, "both path and build",
               'either "path" (a local tokenizer folder) or "build" (train one), not both')


@dataclass
class DataSpec:
    """Local text/json/jsonl/csv/parquet files read through ``datasets``, tokenized and packed."""

    train_files: list[str] | str = field(default_factory=list)
    validation_files: list[str] | str | None = None
    validation_fraction: float = 0.0
    format: Literal["auto", "text", "json", "csv", "parquet"] = "auto"
    text_field: str = "text"
    # text files only: one sample per file, per blank-line separated paragraph, or per line
    sample_by: Literal["document", "paragraph", "line"] = "document"
    seq_len: int = 128
    packing: bool = True
    append_eos: bool = True
    cache_dir: str | None = None
    num_proc: int | None = None

    def validate(self, path: str) -> None:
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.validation_files, str):
            self.validation_files = [self.validation_files]
        _check(0.0 <= self.validation_fraction < 1.0, f"{path}.validation_fraction", self.validation_fraction,
               "a number in [0, 1)")
        _check(not (self.validation_files and self.validation_fraction > 0), f"{path}.validation_fraction",
               self.validation_fraction, '0 when "validation_files" is given (use one or the other)')
        _check(self.seq_len >= 2, f"{path}.seq_len", self.seq_len, "an integer >= 2")
        _check(self.num_proc is None or self.num_proc >= 1, f"{path}.num_proc", self.num_proc, "an integer >= 1 or null")


@dataclass
class TrainingSpec:
    """Optimizer steps, batch geometry, schedule, precision, logging, checkpoints and export."""

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    output_dir: str = "outputs/run"
    export_hf: bool = True
    gradient_checkpointing: bool = False
    num_threads: int | None = None

    def validate(self, path: str) -> None:
        for name, low in (("steps", 1), ("micro_batch_size", 1), ("grad_accum", 1), ("log_every", 1),
                          ("save_every", 0), ("keep_checkpoints", 0), ("eval_every", 0), ("warmup_steps", 0)):
            v = getattr(self, name)
            kind = "a positive integer" if low == 1 else "an integer >= 0"
            _check(v >= low, f"{path}.{name}", v, kind + (" (0: off)" if low == 0 and name != "warmup_steps" else ""))
        _check(self.lr > 0, f"{path}.lr", self.lr, "a number > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), f"{path}.adam_betas",
               self.adam_betas, "two numbers in [0, 1)")
        _check(self.adam_eps > 0, f"{path}.adam_eps", self.adam_eps, "a number > 0")
        _check(self.max_grad_norm >= 0, f"{path}.max_grad_norm", self.max_grad_norm, "a number >= 0 (0: no clipping)")
        _check(self.num_threads is None or self.num_threads >= 1, f"{path}.num_threads", self.num_threads,
               "an integer >= 1 or null (null: CPU cores / local ranks)")
        _check(bool(self.output_dir), f"{path}.output_dir", self.output_dir, "a folder path")


@dataclass
class LauncherSpec:
    """How ``ds-hexamoe train`` starts the ranks through DeepSpeed's launcher."""

    nproc: int | None = None  # processes per node; null: every accelerator (1 on a CPU-only machine)
    hostfile: str | None = None
    master_addr: str | None = None
    master_port: int | None = None  # null: a free port on this machine
    extra_args: list[str] = field(default_factory=list)  # passed to `deepspeed` verbatim, e.g. ["--launcher", "slurm"]

    def validate(self, path: str) -> None:
        _check(self.nproc is None or self.nproc >= 1, f"{path}.nproc", self.nproc, "an integer >= 1 or null")
        _check(self.master_port is None or 1 <= self.master_port <= 65535, f"{path}.master_port", self.master_port,
               "a TCP port in 1..65535 or null (null: a free port)")


@dataclass
class Recipe:
    """A whole training run; see ``docs/recipes.md`` for every key."""

    name: str = "run"
    description: str = ""
    task: str = "causal-lm"
    task_options: dict = field(default_factory=dict)
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec | None = None
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    deepspeed: Any = field(default_factory=dict)  # an inline dict or a path to a JSON file
    hexamoe: dict | None = None
    launcher: LauncherSpec = field(default_factory=LauncherSpec)

    # Set by load_recipe (not recipe keys): where the recipe came from and its parsed pieces.
    source = None  # the recipe file (absolute) or None for a dict
    base_dir = None
    hexamoe_config = None  # the parsed HexaMoEConfig, or None when the recipe has no section

    def validate(self, path: str = "") -> None:
        _check(isinstance(self.task_options, dict), "task_options", self.task_options, "a JSON object")
        if ":" not in self.task:
            _check(self.task in TASKS, "task", self.task,
                   f"one of {sorted(TASKS)} or an importable 'package.module:function'")
        _check(self.hexamoe is None or isinstance(self.hexamoe, dict), "hexamoe", self.hexamoe,
               'a JSON object (the "hexamoe" section of ds_hexamoe.config)')
        _check(isinstance(self.deepspeed, (dict, str)), "deepspeed", self.deepspeed,
               "a JSON object (inline DeepSpeed config) or a path to a DeepSpeed JSON file")
        if self.task == CAUSAL_LM:
            if self.model.path is None:
                mt = self.model.config.get("model_type")
                _check(isinstance(mt, str) and bool(mt), "model.config.model_type", mt,
                       'a transformers model type such as "mixtral" or "qwen3_moe" (needed to build a model from a config)')
            _check(len(self.data.train_files) > 0, "data.train_files", self.data.train_files,
                   "a non-empty list of file paths or glob patterns")
            _check_positions(self.data.seq_len, (self.model.config or {}).get("max_position_embeddings"), "model.config")

    # -- derived views -------------------------------------------------------------------------------

    @property
    def output_dir(self) -> str:
        return self.training.output_dir

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.training.output_dir, "checkpoints")

    @property
    def tokenizer_spec(self) -> TokenizerSpec:
        """The tokenizer to use: the recipe's, else the checkpoint's own (``model.path``)."""
        if self.tokenizer is not None and (self.tokenizer.path or self.tokenizer.build):
            return self.tokenizer
        return TokenizerSpec(path=self.model.path)

    def ds_config(self, world_size: int | None = None, accelerator: str | None = None) -> dict:
        """The DeepSpeed config of this run: the recipe's DeepSpeed section with batch geometry,
        precision, optimizer and the ``"hexamoe"`` section filled in from the recipe."""
        return build_ds_config(self, world_size, accelerator)

    def to_dict(self) -> dict:
        """The recipe's keys as plain JSON-able values (after resolution: absolute paths)."""
        return dataclasses.asdict(self)


def _recipe_from_dict(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {where}: got {type(data).__name__}; expected a JSON object")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Recipe)
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown recipe key{hint}; allowed keys are {sorted(fields)}")
        if key == "deepspeed":
            kwargs[key] = value
            continue
        kwargs[key] = _coerce(hints[key], value, key)
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
) -> Recipe:
    """Parse, resolve and validate a recipe (``None``: the embedded default).

    ``overrides`` maps dotted keys (``"training.steps"``) to values, applied before validation, so they
    are checked like the file's own values. With ``check_files`` every input path must exist.
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
    recipe.source, recipe.base_dir = source, base_dir
    _resolve_paths(recipe)
    recipe.hexamoe_config = _validate_hexamoe(recipe)
    if check_files:
        check_recipe_files(recipe)
    _check_ds_config(recipe)
    return recipe


def _resolve_paths(r: Recipe) -> None:
    base = r.base_dir
    if r.model.path is not None and not _is_placeholder(r.model.path):
        r.model.path = resolve_path(r.model.path, base)
    if r.tokenizer is not None and r.tokenizer.path is not None and not _is_placeholder(r.tokenizer.path):
        r.tokenizer.path = resolve_path(r.tokenizer.path, base)
    keep = lambda p: p if _is_placeholder(p) else resolve_path(p, base)  # noqa: E731
    r.data.train_files = [keep(p) for p in r.data.train_files]
    if r.data.validation_files:
        r.data.validation_files = [keep(p) for p in r.data.validation_files]
    if r.data.cache_dir is not None:
        r.data.cache_dir = resolve_path(r.data.cache_dir, base)
    if isinstance(r.deepspeed, str):
        r.deepspeed = resolve_path(r.deepspeed, base)
    if r.launcher.hostfile is not None:
        r.launcher.hostfile = resolve_path(r.launcher.hostfile, base)
    # outputs live under the working directory, never inside an installed package
    r.training.output_dir = os.path.abspath(os.path.expanduser(r.training.output_dir))
    if r.hexamoe:
        for key in ("devices_file", "stats_path"):
            if isinstance(r.hexamoe.get(key), str):
                r.hexamoe[key] = resolve_path(r.hexamoe[key], base)


def _validate_hexamoe(r: Recipe) -> HexaMoEConfig | None:
    section = r.hexamoe
    if section is None:
        inline = r.deepspeed if isinstance(r.deepspeed, dict) else None
        section = inline.get("hexamoe") if inline else None
    if section is None:
        return None
    return HexaMoEConfig.from_dict(section, "hexamoe")


def expand_patterns(patterns: list[str], key: str) -> list[str]:
    """Sorted, de-duplicated files matched by ``patterns``; a pattern that matches nothing is an error."""
    files: list[str] = []
    for i, pat in enumerate(patterns):
        if _is_placeholder(pat):
            raise ConfigError(f"{key}[{i}]: {pat!r} is a placeholder; fill in your local data files or glob pattern "
                              "(text/json/jsonl/csv/parquet)")
        hits = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        if not hits:
            what = "file does not exist" if not glob.has_magic(pat) else "pattern matches no files"
            raise ConfigError(f"{key}[{i}]: {what}: {pat!r}; give existing local data files "
                              "(relative paths are resolved from the recipe's folder)")
        files.extend(h for h in hits if h not in files)
    return files


def _check_checkpoint_dir(path: str, key: str, what: str) -> None:
    if _is_placeholder(path):
        raise ConfigError(
            f"{key}: {path!r} is a placeholder; fill in the local folder of the downloaded {what} "
            "(this recipe does not download anything)")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: folder {path!r} does not exist; give a local {what} folder")


def check_recipe_files(r: Recipe) -> None:
    """Every input the recipe names must exist (raised before anything is launched)."""
    if r.model.path is not None:
        _check_checkpoint_dir(r.model.path, "model.path", "Hugging Face checkpoint (config.json + weights)")
        if not os.path.isfile(os.path.join(r.model.path, "config.json")):
            raise ConfigError(f"model.path: {r.model.path!r} has no config.json; give a Hugging Face checkpoint folder")
    if r.task == CAUSAL_LM:
        if r.model.path is not None and "max_position_embeddings" not in (r.model.config or {}):
            with open(os.path.join(r.model.path, "config.json")) as fh:
                cfg = json.load(fh)
            _check_positions(r.data.seq_len, cfg.get("max_position_embeddings"), f"{r.model.path}/config.json")
        _check_text_inputs(r)
    elif r.data.train_files:
        expand_patterns(r.data.train_files, "data.train_files")
    if isinstance(r.deepspeed, str) and not os.path.isfile(r.deepspeed):
        raise ConfigError(f"deepspeed: file {r.deepspeed!r} does not exist; give an existing DeepSpeed JSON "
                          "file (relative to the recipe's folder) or an inline JSON object")
    if r.launcher.hostfile is not None and not os.path.isfile(r.launcher.hostfile):
        raise ConfigError(f"launcher.hostfile: file {r.launcher.hostfile!r} does not exist; give a DeepSpeed "
                          "hostfile ('host slots=N' per line) or leave it null for a single node")


def _check_positions(seq_len: int, limit: Any, where: str) -> None:
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds max_position_embeddings = {limit} of {where}; lower "
                          "data.seq_len")


def _check_text_inputs(r: Recipe) -> None:
    tok = r.tokenizer_spec
    if tok.path is None and tok.build is None:
        raise ConfigError('tokenizer: a model built from "config" needs a tokenizer: set "tokenizer.path" to a '
                          'local tokenizer folder or "tokenizer.build" to train one on the data')
    if tok.path is not None:
        _check_checkpoint_dir(tok.path, "tokenizer.path", "tokenizer")
        if not any(os.path.isfile(os.path.join(tok.path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
            raise ConfigError(f"tokenizer.path: {tok.path!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    from .data import check_data_files

    check_data_files(r)


def _load_ds_dict(r: Recipe) -> dict:
    if isinstance(r.deepspeed, dict):
        return copy.deepcopy(r.deepspeed)
    if not os.path.isfile(r.deepspeed):
        raise ConfigError(f"deepspeed: file {r.deepspeed!r} does not exist; give an existing DeepSpeed JSON file")
    with open(r.deepspeed) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed: {r.deepspeed!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {r.deepspeed!r} holds a {type(data).__name__}; expected a JSON object")
    return data


def _check_ds_config(r: Recipe) -> None:
    ds = _load_ds_dict(r) if (isinstance(r.deepspeed, dict) or os.path.isfile(r.deepspeed)) else None
    if ds is None:
        return
    t = r.training
    want = {"train_micro_batch_size_per_gpu": (t.micro_batch_size, "training.micro_batch_size"),
            "gradient_accumulation_steps": (t.grad_accum, "training.grad_accum")}
    for key, (value, owner) in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"deepspeed.{key}: {ds[key]!r} conflicts with {owner} = {value!r}; remove it from "
                              "the DeepSpeed config (the recipe sets it)")
    clip = ds.get("gradient_clipping")
    if clip is not None and t.max_grad_norm > 0 and clip != t.max_grad_norm:
        raise ConfigError(f"deepspeed.gradient_clipping: {clip!r} conflicts with training.max_grad_norm = "
                          f"{t.max_grad_norm!r}; remove one of them")
    for name in ("bf16", "fp16"):
        sec = ds.get(name)
        if isinstance(sec, dict) and sec.get("enabled", False) and t.dtype != name:
            raise ConfigError(f"deepspeed.{name}.enabled: true conflicts with training.dtype = {t.dtype!r}; set "
                              f'training.dtype to "{name}" or disable it in the DeepSpeed config')
    if "hexamoe" in ds and r.hexamoe is not None and ds["hexamoe"] != r.hexamoe:
        raise ConfigError('hexamoe: the recipe and its DeepSpeed config both set a "hexamoe" section and they '
                          "differ; keep one (the recipe's top-level \"hexamoe\" is preferred)")
    if "hexamoe" in ds and r.hexamoe is None and not isinstance(r.deepspeed, dict):
        HexaMoEConfig.from_dict(ds["hexamoe"], "deepspeed.hexamoe")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed.zero_optimization: got {zero!r}; expected a JSON object")


def build_ds_config(r: Recipe, world_size: int | None = None, accelerator: str | None = None) -> dict:
    """The run's DeepSpeed config (see :meth:`Recipe.ds_config`).

    The learning-rate schedule is not put here: the worker passes :func:`lr_lambda` as a client
    scheduler (DeepSpeed's own warmup schedulers run the first step at lr 0) unless the DeepSpeed
    config names a ``"scheduler"`` of its own."""
    ds = _load_ds_dict(r)
    t = r.training
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    if world_size is not None:
        ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    else:
        ds.pop("train_batch_size", None)
    if t.dtype in ("bf16", "fp16"):
        ds.setdefault(t.dtype, {})["enabled"] = True
    if t.max_grad_norm > 0:
        ds.setdefault("gradient_clipping", t.max_grad_norm)
    if "optimizer" not in ds:
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}}
        if accelerator == "cpu":
            # DeepSpeed's FusedAdam needs a compiled op on CPU; torch's AdamW is the same update
            ds["optimizer"]["params"]["torch_adam"] = True
    section = r.hexamoe if r.hexamoe is not None else ds.get("hexamoe")
    if section is not None:
        ds["hexamoe"] = copy.deepcopy(section)
    ds.setdefault("steps_per_print", max(t.steps + 1, 10**9))  # the worker logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def lr_lambda(t: TrainingSpec):
    """Learning-rate multiplier of the ``s``-th optimizer step (0-based): linear warmup reaching 1 at
    step ``warmup_steps - 1``, then cosine or linear decay to ``min_lr_ratio`` at the last step."""

    def fn(s: int) -> float:
        if s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        span = max(1, t.steps - t.warmup_steps - 1)
        progress = min(1.0, (s - t.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1.0 - progress
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return fn


def task_builder(recipe: Recipe):
    """The function building the recipe's task (``TASKS`` name or ``"package.module:function"``)."""
    target = TASKS.get(recipe.task, recipe.task)
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task: cannot import {target!r} ({e}); allowed values are {sorted(TASKS)} or an "
                          "importable 'package.module:function'") from None
    return fn


def recipe_json(recipe: Recipe) -> str:
    """The resolved recipe as JSON (paths absolute, overrides applied), as saved next to a run."""
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=False)

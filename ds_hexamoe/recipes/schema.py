"""The recipe schema: one JSON file naming the model, tokenizer, data, training settings, the DeepSpeed
config, the ``"hexamoe"`` section and the launcher, as typed dataclasses validated before any work
(docs/design.md, "Recipes, tasks, worker and CLI").

Every key is checked the way :mod:`ds_hexamoe.config` checks the ``"hexamoe"`` section: an unknown key
or a bad value raises :class:`~ds_hexamoe.config.ConfigError` naming the dotted key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import Collector, ConfigError, _check
from .ds_config import build_ds_config
from .instruct import check_instruct_spec
from .logging_spec import GenerateSpec, LoggingSpec

# Training tasks: name -> "module:function" building a :class:`ds_hexamoe.tasks.TaskParts`. A recipe
# may also name an importable "package.module:function" in its "task" key, but only together with
# "trust_task_import": true (docs/reliability.md, "Trust boundary").
TASKS: dict[str, str] = {
    "causal-lm": "ds_hexamoe.tasks.causal_lm:causal_lm_task",
    "image-classification": "ds_hexamoe.tasks.image_classification:image_classification_task",
}
CAUSAL_LM = "causal-lm"


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
    """Local text/json/jsonl/csv/parquet files read through ``datasets``, tokenized and packed; or
    instruction records (``format`` "chat"/"prompt_completion", :mod:`.instruct`)."""

    train_files: list[str] | str = field(default_factory=list)
    validation_files: list[str] | str | None = None
    validation_fraction: float = 0.0
    format: Literal["auto", "text", "json", "csv", "parquet", "chat", "prompt_completion"] = "auto"
    text_field: str = "text"
    messages_field: str = "messages"  # "chat": the list of {"role", "content"} messages
    prompt_field: str = "prompt"  # "prompt_completion": the two text fields
    completion_field: str = "completion"
    chat_template: str | None = None  # "chat": a Jinja template or a built-in name; null: the tokenizer's
    completion_only_loss: bool = True  # instruction formats: loss on completion tokens only
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
        check_instruct_spec(self, path)


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
    generate: GenerateSpec | None = None  # greedy samples at evaluation steps

    def validate(self, path: str) -> None:
        found = Collector()  # independent checks: every bad value is reported at once
        for name, low in (("steps", 1), ("micro_batch_size", 1), ("grad_accum", 1), ("log_every", 1),
                          ("save_every", 0), ("keep_checkpoints", 0), ("eval_every", 0), ("warmup_steps", 0)):
            v = getattr(self, name)
            kind = "a positive integer" if low == 1 else "an integer >= 0"
            off = " (0: off)" if low == 0 and name != "warmup_steps" else ""
            found.run(_check, v >= low, f"{path}.{name}", v, kind + off)
        found.run(_check, math.isfinite(self.lr) and self.lr > 0, f"{path}.lr", self.lr, "a number > 0 (finite)")
        found.run(_check, 0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio", self.min_lr_ratio,
                  "a number in [0, 1]")
        found.run(_check, math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"{path}.weight_decay",
                  self.weight_decay, "a number >= 0 (finite)")
        # 2**63 - 1 at most: torch seeds are 64-bit, and the batch order is seeded with seed + epoch
        found.run(_check, 0 <= self.seed < 2**63, f"{path}.seed", self.seed, "an integer >= 0 and < 2**63")
        found.run(_check, len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                  f"{path}.adam_betas", self.adam_betas, "two numbers in [0, 1)")
        found.run(_check, self.adam_eps > 0, f"{path}.adam_eps", self.adam_eps, "a number > 0")
        found.run(_check, self.max_grad_norm >= 0, f"{path}.max_grad_norm", self.max_grad_norm,
                  "a number >= 0 (0: no clipping)")
        found.run(_check, self.num_threads is None or self.num_threads >= 1, f"{path}.num_threads", self.num_threads,
                  "an integer >= 1 or null (null: CPU cores / local ranks)")
        found.run(_check, bool(self.output_dir), f"{path}.output_dir", self.output_dir, "a folder path")
        found.raise_all()


@dataclass
class PeftSpec:
    """LoRA adapters through PEFT: ``target_modules`` (linear layers, e.g. the attention projections) and
    ``target_parameters`` (fused 3-D expert weights, e.g. ``mlp.experts.gate_up_proj``), each matched like PEFT
    does (the full name or a ``.``-separated suffix of it); only the adapters (and ``modules_to_save``) train."""

    type: Literal["lora"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)
    modules_to_save: list[str] | None = None
    init: Literal["default", "gaussian"] = "default"  # PEFT's init_lora_weights: True or "gaussian" (B = 0 in both)
    export_merged: bool = False  # also write hf/: the base with the adapters merged (merge_and_unload)

    def validate(self, path: str) -> None:
        found = Collector()
        found.run(_check, self.r >= 1, f"{path}.r", self.r, "an integer >= 1 (the adapters' rank)")
        found.run(_check, math.isfinite(self.alpha) and self.alpha > 0, f"{path}.alpha", self.alpha,
                  "a number > 0 (the adapters' output is scaled by alpha / r)")
        found.run(_check, 0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "a number in [0, 1)")
        found.run(_check, bool(self.target_modules or self.target_parameters), f"{path}.target_modules", [],
                  'a non-empty list of module names (e.g. ["q_proj", "v_proj"]), or a non-empty '
                  f'{path}.target_parameters (e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])')
        for key in ("target_modules", "target_parameters", "modules_to_save"):
            names = getattr(self, key) or []
            bad = [n for n in names if not n.strip()]
            found.run(_check, not bad and len(set(names)) == len(names), f"{path}.{key}", names,
                      "a list of distinct, non-empty names")
        # PEFT's ParamWrapper (LoRA on a parameter) has no dropout and refuses a config that asks for one
        found.run(_check, not (self.target_parameters and self.dropout), f"{path}.dropout", self.dropout,
                  f"0 when {path}.target_parameters is set (PEFT's LoRA on parameters has no dropout); set it to 0, "
                  "or drop target_parameters")
        found.raise_all()


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
    # a "package.module:function" task runs arbitrary code: only when the recipe says it trusts it
    trust_task_import: bool = False
    task_options: dict = field(default_factory=dict)
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec | None = None
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    deepspeed: Any = field(default_factory=dict)  # an inline dict or a path to a JSON file
    hexamoe: dict | None = None
    peft: PeftSpec | None = None  # LoRA fine-tuning (ds_hexamoe.tasks.peft); null: every weight trains
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)  # TensorBoard / Weights & Biases

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
            check_positions(self.data.seq_len, (self.model.config or {}).get("max_position_embeddings"), "model.config")

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


def check_positions(seq_len: int, limit: Any, where: str) -> None:
    """``data.seq_len`` must fit the model's ``max_position_embeddings`` (when it has one)."""
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds max_position_embeddings = {limit} of {where}; lower "
                          "data.seq_len")

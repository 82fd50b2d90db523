"""Causal language modeling: a tokenizer (loaded or trained), local text files through ``datasets``
cut into fixed-length blocks, the model, and :func:`causal_lm_task` (docs/design.md, "Recipes, tasks,
worker and CLI").

``build_tokenizer(recipe)``, ``build_dataset(recipe, tokenizer)`` and ``build_model(recipe, tokenizer)``
are the reusable builders; the training worker, the routing profiler and the tests all use them, so
every tool sees the same tokens and the same model.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..recipes import Recipe, TokenizerBuildSpec, resolve_data_files
from ..recipes.instruct import INSTRUCT_FORMATS
from ..atomic import atomic_save_dir
from ..distributed import seed_all
from ..hetero.batching import count_tokens
from .base import TaskParts, WorkerContext
from .instruct import collate_instruct, encode_examples

TOKENIZER_STAMP = "hexamoe_tokenizer.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_documents(recipe: Recipe, split: str = "train"):
    """The raw documents of ``split`` ("train" or "validation") as a ``datasets.Dataset`` with a "text" column
    (instruction formats: the records as they are, rendered by :mod:`.instruct`)."""
    import datasets

    files = resolve_data_files(recipe)
    paths = files.train if split == "train" else files.validation
    if paths is None:
        raise ConfigError(f"data: no {split} files in this recipe")
    kwargs: dict[str, Any] = {}
    if files.format == "text":
        kwargs["sample_by"] = recipe.data.sample_by
    ds = datasets.load_dataset(files.format, data_files={split: paths}, split=split,
                               cache_dir=recipe.data.cache_dir, **kwargs)
    if recipe.data.format in INSTRUCT_FORMATS:
        return ds
    field = "text" if files.format == "text" else recipe.data.text_field
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field: {field!r} is not a column of the data; columns are {ds.column_names}")
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds.select_columns(["text"])


def _iter_texts(ds, batch: int = 1000) -> Iterator[list[str]]:
    for i in range(0, len(ds), batch):
        yield [t for t in ds[i : i + batch]["text"] if t]


def train_bpe(texts: Iterator[list[str]], spec: TokenizerBuildSpec, length: int | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (batches of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, show_progress=False,
        special_tokens=[spec.eos_token, spec.pad_token], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec.eos_token, pad_token=spec.pad_token,
                                   model_max_length=1 << 30)


def tokenizer_fingerprint(recipe: Recipe) -> str:
    """What a trained tokenizer depends on: the build settings and the training files' names and sizes."""
    files = resolve_data_files(recipe)
    build = recipe.tokenizer_spec.build
    key = {"build": None if build is None else vars(build), "format": files.format, "sample_by": recipe.data.sample_by,
           "text_field": recipe.data.text_field,
           "files": [(f, os.path.getsize(f)) for f in files.train]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer(recipe: Recipe, save_dir: str | None = None):
    """The recipe's tokenizer: loaded from ``tokenizer.path`` (or ``model.path``), or trained (``tokenizer.build``).

    With ``save_dir``, a trained tokenizer is reused from there when its fingerprint matches, and
    otherwise trained and saved there atomically.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = recipe.tokenizer_spec
    if spec.path is not None:
        tok = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=recipe.model.trust_remote_code)
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer.path: the tokenizer in {spec.path!r} has no eos_token; packing needs one")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # labels mask padding by attention mask, so sharing ids is safe
        return tok
    fp = tokenizer_fingerprint(recipe)
    if save_dir is not None and saved_tokenizer_fingerprint(save_dir) == fp:
        return PreTrainedTokenizerFast.from_pretrained(save_dir)
    docs = load_documents(recipe, "train")
    tok = train_bpe(_iter_texts(docs), spec.build, length=len(docs))
    if save_dir is not None:
        def write(tmp):
            tok.save_pretrained(tmp)
            with open(os.path.join(tmp, TOKENIZER_STAMP), "w") as fh:
                json.dump({"fingerprint": fp}, fh)

        atomic_save_dir(write, save_dir)
    return tok


def saved_tokenizer_fingerprint(save_dir: str) -> str | None:
    try:
        with open(os.path.join(save_dir, TOKENIZER_STAMP)) as fh:
            return json.load(fh).get("fingerprint")
    except (OSError, ValueError):
        return None


@dataclass
class TextData:
    """Fixed-length token blocks: ``train`` and optional ``validation`` (``datasets.Dataset``s of "input_ids";
    ``instruct``: also "labels" and "position_ids" of whole examples, :mod:`.instruct`)."""

    train: Any
    validation: Any | None
    seq_len: int
    packed: bool
    pad_token_id: int
    instruct: bool = False

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.instruct:
            return collate_instruct(items, self.pad_token_id)
        return collate_causal_lm(items, self.pad_token_id)


def collate_causal_lm(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack blocks into ``input_ids``/``labels`` (+ ``attention_mask`` and -100 labels on padding)."""
    seqs = [torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items]
    width = max(s.numel() for s in seqs)
    if all(s.numel() == width for s in seqs):
        ids = torch.stack(seqs)
        return {"input_ids": ids, "labels": ids.clone()}
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : s.numel()] = s
        mask[i, : s.numel()] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tokenize_split(docs, tokenizer, recipe: Recipe, desc: str):
    d = recipe.data
    if d.format in INSTRUCT_FORMATS:
        return encode_examples(docs, tokenizer, recipe, desc)
    eos = tokenizer.eos_token_id
    seq_len = d.seq_len

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if d.append_eos:
            ids = [x + [eos] for x in ids]
        if not d.packing:
            ids = [x[:seq_len] for x in ids if x]
        return {"input_ids": ids}

    def pack(batch):
        # standard causal-LM packing: concatenate documents, cut fixed blocks, drop the tail
        flat = list(itertools.chain.from_iterable(batch["input_ids"]))
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, n, seq_len)]}

    out = docs.map(tokenize, batched=True, remove_columns=docs.column_names, num_proc=d.num_proc,
                   desc=f"tokenize {desc}")
    if d.packing:
        out = out.map(pack, batched=True, batch_size=1000, num_proc=d.num_proc, desc=f"pack {desc}")
    return out


def build_dataset(recipe: Recipe, tokenizer) -> TextData:
    """Tokenized, packed (or truncated) train and validation blocks of the recipe's data."""
    d = recipe.data
    train = _tokenize_split(load_documents(recipe, "train"), tokenizer, recipe, "train")
    if len(train) == 0:
        raise ConfigError(f"data.seq_len: {d.seq_len} leaves no training block (the data has fewer tokens); lower "
                          "data.seq_len or add data")
    val = None
    if d.validation_files:
        val = _tokenize_split(load_documents(recipe, "validation"), tokenizer, recipe, "validation")
    elif d.validation_fraction > 0:
        n_val = int(round(len(train) * d.validation_fraction))
        if n_val < 1 or n_val >= len(train):
            raise ConfigError(f"data.validation_fraction: {d.validation_fraction} of {len(train)} blocks leaves an empty "
                              "split; change the fraction or seq_len")
        split = train.train_test_split(test_size=n_val, seed=recipe.training.seed, shuffle=True)
        train, val = split["train"], split["test"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TextData(train=train.with_format("torch"), validation=None if val is None else val.with_format("torch"),
                    seq_len=d.seq_len, packed=d.packing, pad_token_id=pad, instruct=d.format in INSTRUCT_FORMATS)


def build_model(recipe: Recipe, tokenizer=None, *, meta: bool = False) -> torch.nn.Module:
    """The recipe's causal LM: ``from_pretrained(model.path)`` or a fresh model of ``model.config``, with
    the recipe's experts implementation, in the training dtype. A fresh model's vocabulary and special
    token ids follow ``tokenizer``; its weights are those of :func:`ds_hexamoe.models.meta_init.materialize`
    (the model's own ``_init_weights``, each module seeded by ``training.seed`` and its name: the same on any
    rank count, whole or in part). ``meta``: on the meta device, from the config alone (shapes and dtype, no
    weights read or allocated: what ``ds-hexamoe plan`` and a zebra rank building only its part start from)."""
    # "hexamoe" is a registered experts implementation already: ds_hexamoe/__init__ runs before this module
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.meta_init import materialize

    m = recipe.model
    dtype = _DTYPES[recipe.training.dtype]
    kwargs = dict(experts_implementation=m.experts_implementation, trust_remote_code=m.trust_remote_code)
    if m.path is not None and not meta:
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype, **(m.config or {}), **kwargs)
        return _finish_model(model, recipe)
    if m.path is not None:
        config = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code, **(m.config or {}))
    else:
        config = _fresh_config(dict(m.config), tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs).to(dtype)
    if not meta:
        materialize(model, recipe.training.seed)
    return _finish_model(model, recipe)


def zebra_builds_part(recipe: Recipe) -> bool:
    """``hexamoe.zebra`` may run (true, or ``"auto"`` with nothing the pipeline refuses): the model starts on
    the meta device and each zebra rank builds only its part (``worker/zebra.py``: reads it from the checkpoint,
    or initializes it); when ``"auto"`` picks the colocated step, the loop builds the whole model then
    (``TaskParts.whole_model``)."""
    from ..recipes.checks import check_zebra

    cfg = recipe.hexamoe_config
    if cfg is None or not cfg.enabled or cfg.zebra.enabled not in (True, "auto"):
        return False
    if cfg.zebra.enabled == "auto":
        try:
            check_zebra(recipe, auto=True)
        except ConfigError:
            return False
    return True


def _fresh_config(cfg_dict: dict, tokenizer):
    """The transformers config of ``model.config`` (vocabulary and special token ids from ``tokenizer``)."""
    from transformers import AutoConfig

    model_type = cfg_dict.pop("model_type")
    if tokenizer is not None:
        n = len(tokenizer)
        vocab = cfg_dict.setdefault("vocab_size", n)
        if vocab < n:
            raise ConfigError(f"model.config.vocab_size: {vocab} is smaller than the tokenizer's {n} tokens; raise it "
                              "or leave it out (it then follows the tokenizer)")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            tid = getattr(tokenizer, name, None)
            cfg_dict.setdefault(name, tid)
    try:
        return AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.config.model_type: {model_type!r} is not a transformers model type ({e})") from None


def _finish_model(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if (recipe.training.gradient_checkpointing or recipe.data.format in INSTRUCT_FORMATS) and hasattr(
            model.config, "use_cache"):
        # a KV cache is useless in training; it conflicts with recompute, and with a cache transformers'
        # mask builder ignores restarted position ids, so packed examples would attend to each other
        model.config.use_cache = False
    return model


def causal_lm_task(recipe: Recipe, ctx: WorkerContext) -> TaskParts:
    """Causal language modeling on packed text blocks."""
    save = os.path.join(ctx.output_dir, "tokenizer") if recipe.tokenizer_spec.build is not None else None
    with ctx.main_first():
        if save is None or ctx.is_main:
            tokenizer = build_tokenizer(recipe, save_dir=save)
        else:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(save)  # exactly the one rank 0 trained
    with ctx.main_first():
        data = build_dataset(recipe, tokenizer)
    seed_all(recipe.training.seed)  # the same random state on every rank, whatever ran before
    part = zebra_builds_part(recipe)
    model = build_model(recipe, tokenizer, meta=part)

    def count(batch):
        # the tokens the loss averages over (labels != -100 after the one-token shift: not padding, and only
        # completions for instruction data), so uneven shares and validation weigh ranks and batches by them
        return count_tokens(batch["labels"])

    return TaskParts(model=model, train=data.train, validation=data.validation, collate=data.collate,
                     processor=tokenizer, unit="tok", count=count,
                     whole_model=(lambda: build_model(recipe, tokenizer)) if part else None)

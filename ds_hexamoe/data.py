"""Recipe data: local files through ``datasets``, a tokenizer (loaded or trained), fixed-length blocks.

``build_tokenizer(recipe)`` and ``build_dataset(recipe, tokenizer)`` are the reusable builders; the
training worker, the routing profiler and the tests all use them, so every tool sees the same tokens.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError
from .recipes import Recipe, TokenizerBuildSpec, expand_patterns

_EXT_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
TOKENIZER_STAMP = "hexamoe_tokenizer.json"


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
    train: list[str]
    validation: list[str] | None
    format: str


def resolve_data_files(recipe: Recipe) -> DataFiles:
    """Expand the recipe's data patterns; missing files and mixed formats are errors."""
    d = recipe.data
    train = expand_patterns(d.train_files, "data.train_files")
    val = expand_patterns(d.validation_files, "data.validation_files") if d.validation_files else None
    fmt = infer_format(train + (val or []), d.format, "data.train_files")
    return DataFiles(train, val, fmt)


def check_data_files(recipe: Recipe) -> DataFiles:
    """:func:`resolve_data_files` plus a cheap check that the text field exists in the first record."""
    files = resolve_data_files(recipe)
    if files.format != "text":
        for f in [files.train[0]] + (files.validation[:1] if files.validation else []):
            cols = _peek_columns(f, files.format)
            if cols is not None and recipe.data.text_field not in cols:
                raise ConfigError(f"data.text_field: {recipe.data.text_field!r} is not a field of {f!r}; its fields are "
                                  f"{cols}")
    return files


def load_documents(recipe: Recipe, split: str = "train"):
    """The raw documents of ``split`` ("train" or "validation") as a ``datasets.Dataset`` with a "text" column."""
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


def atomic_save_dir(write, final: str) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` onto ``final`` (an old ``final`` is replaced whole)."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        write(tmp)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    """Fixed-length token blocks: ``train`` and optional ``validation`` (``datasets.Dataset``s of "input_ids")."""

    train: Any
    validation: Any | None
    seq_len: int
    packed: bool
    pad_token_id: int

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
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
                    seq_len=d.seq_len, packed=d.packing, pad_token_id=pad)

"""Instruction data for causal-LM fine-tuning (``data.format`` "chat" or "prompt_completion"): records
rendered and tokenized with completion-only labels, packed without attention across examples, and the
count of the tokens the loss averages over (docs/recipes.md, "Instruction data").

A packed row holds whole examples, each with its own ``position_ids`` from 0; the collate adds no
``attention_mask``, so transformers' mask builder (``masking_utils.find_packed_sequence_indices``) turns
the position restarts into a block-diagonal causal mask and RoPE sees every example at its own
positions: a packed example gives the loss and gradients it gives alone. Padding is one more segment
with labels -100.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..recipes.instruct import check_record, record_pieces, resolve_chat_template

IGNORE = -100


def encode_examples(records, tokenizer, recipe, desc: str):
    """``records`` (a ``datasets.Dataset`` of raw instruction records) as "input_ids"/"labels" examples of at
    most ``data.seq_len`` tokens; prompt tokens are labelled -100 (``data.completion_only_loss``), and so
    is every example's first token (nothing before it in the example predicts it). Examples left without a
    labelled token by truncation are dropped."""
    d = recipe.data
    template = None
    if d.format == "chat":
        where = getattr(tokenizer, "name_or_path", "") or "the recipe's"
        template = resolve_chat_template(d, getattr(tokenizer, "chat_template", None), repr(where))
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    eos = tokenizer.eos_token if d.append_eos else None

    def encode(batch, idx):
        out = {"input_ids": [], "labels": []}
        for n, i in enumerate(idx):
            rec = {k: batch[k][n] for k in batch}
            check_record(rec, d, f"record {i} of the {desc} data", f"data.{desc}_files")
            ids, labels = [], []
            for text, learn in record_pieces(rec, d, template, specials, eos):
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if learn or not d.completion_only_loss else [IGNORE] * len(piece)
            ids, labels = ids[: d.seq_len], labels[: d.seq_len]
            if labels:
                labels[0] = IGNORE
            if any(x != IGNORE for x in labels):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out

    out = records.map(encode, batched=True, with_indices=True, remove_columns=records.column_names,
                      num_proc=d.num_proc, desc=f"render {desc}")
    if len(out) == 0:
        raise ConfigError(f"data.seq_len: {d.seq_len} tokens leave no {desc} example with a completion token "
                          "(prompts longer than that are cut before their completion); raise data.seq_len")
    return pack_examples(out, d.seq_len, d.num_proc, desc) if d.packing else out.map(
        lambda b: {"position_ids": [list(range(len(x))) for x in b["input_ids"]]}, batched=True, desc=f"positions {desc}")


def pack_examples(examples, seq_len: int, num_proc: int | None = None, desc: str = "train"):
    """Whole examples, in order, into rows of at most ``seq_len`` tokens (a row closes when the next example
    does not fit); "position_ids" restart at 0 for every example."""

    def pack(batch):
        rows = {"input_ids": [], "labels": [], "position_ids": []}
        cur = {k: [] for k in rows}
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > seq_len:
                for k in rows:
                    rows[k].append(cur[k])
                cur = {k: [] for k in rows}
            cur["input_ids"] += ids
            cur["labels"] += labels
            cur["position_ids"] += list(range(len(ids)))
        if cur["input_ids"]:
            for k in rows:
                rows[k].append(cur[k])
        return rows

    return examples.map(pack, batched=True, batch_size=1000, remove_columns=examples.column_names,
                        num_proc=num_proc, desc=f"pack {desc}")


def collate_instruct(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows padded to the batch's widest: padding is its own segment (positions from 0, labels -100), so no
    ``attention_mask`` is needed and the position restarts give the block-diagonal mask."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(len(items), 1)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
        pos[i, :n] = torch.as_tensor(it["position_ids"], dtype=torch.long)
        pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}



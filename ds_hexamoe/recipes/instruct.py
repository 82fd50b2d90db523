"""Instruction data (``data.format`` "chat" or "prompt_completion"), the torch-free half: the chat template a
recipe uses, the shape every record must have, and a record rendered into prompt and completion pieces
(docs/recipes.md, "Instruction data"). The same functions check the first records before launch and
render every record in the worker (:mod:`ds_hexamoe.tasks.instruct`), so what passes ``ds-hexamoe
validate`` is what trains. No torch.
"""
from __future__ import annotations

import json
import os

from ..config import ConfigError

INSTRUCT_FORMATS = ("chat", "prompt_completion")
# one assistant turn is exactly "<|assistant|>\n" + content + EOS, so a model learns to stop after it
BUILTIN_TEMPLATES = {
    "simple": ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
               "{{ '<|assistant|>\n' + m['content'] + eos_token }}"
               "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}
RENDER_CHECKED = 64  # records rendered before launch (their structure is checked for many more)
_SCAN_BYTES = 64 << 20


def check_instruct_spec(d, path: str) -> None:
    """``data`` keys that only make sense together (called by ``DataSpec.validate``)."""
    if d.chat_template is not None and d.format != "chat":
        raise ConfigError(f'{path}.chat_template: only used with {path}.format "chat" (got {d.format!r}); remove it '
                          'or set format to "chat"')
    if d.chat_template is not None and "{" not in d.chat_template and d.chat_template not in BUILTIN_TEMPLATES:
        raise ConfigError(f"{path}.chat_template: {d.chat_template!r} is neither a built-in template "
                          f"{sorted(BUILTIN_TEMPLATES)} nor a Jinja template string")


def resolve_chat_template(d, own, tokenizer_where: str) -> str:
    """The template that renders chat records: ``data.chat_template`` (a built-in name or Jinja), else the
    tokenizer's own ``own`` (a string, or a dict/list of named templates: its "default")."""
    if d.chat_template is not None:
        return BUILTIN_TEMPLATES.get(d.chat_template, d.chat_template)
    if isinstance(own, list):
        own = {t.get("name"): t.get("template") for t in own if isinstance(t, dict)}
    if isinstance(own, dict):
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        return own
    raise ConfigError(f'data.chat_template: the tokenizer ({tokenizer_where}) has no chat template, so "chat" records '
                      f'cannot be rendered; set data.chat_template to a Jinja template or a built-in name '
                      f"{sorted(BUILTIN_TEMPLATES)}")


def tokenizer_folder_template(folder: str):
    """The chat template saved in a tokenizer folder (``chat_template.jinja`` or ``tokenizer_config.json``)."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            return fh.read()
    cfg = _tokenizer_config(folder)
    return cfg.get("chat_template")


def folder_special_tokens(folder: str) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... of a tokenizer folder, as the template sees them."""
    out = {}
    for k, v in _tokenizer_config(folder).items():
        v = v.get("content") if isinstance(v, dict) else v
        if k.endswith("_token") and isinstance(v, str):
            out[k] = v
    return out


def _tokenizer_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def check_record(rec, d, where: str, key: str = "data.train_files") -> None:
    """A record of ``data.format`` "chat"/"prompt_completion" has its fields with the right types; ``key``:
    the files it came from."""
    if not isinstance(rec, dict):
        raise ConfigError(f"{key}: {where} is {type(rec).__name__}, not a JSON object; give one record per line")
    fields = ([("messages_field", d.messages_field)] if d.format == "chat"
              else [("prompt_field", d.prompt_field), ("completion_field", d.completion_field)])
    for option, name in fields:
        if rec.get(name) is None:
            raise ConfigError(f"data.{option}: {where} has no {name!r} field (its fields are {sorted(rec)}); add it "
                              f"to every record or set data.{option} to the field that holds it")
    if d.format == "prompt_completion":
        for _, name in fields:
            if not isinstance(rec[name], str):
                raise ConfigError(f"{key}: {where} field {name!r} is {type(rec[name]).__name__}; "
                                  '"prompt_completion" records hold text in both fields (use format "chat" for messages)')
        if d.completion_only_loss and not rec[d.completion_field]:
            raise ConfigError(f"{key}: {where} has an empty {d.completion_field!r}; nothing to learn from it")
        return
    msgs = rec[d.messages_field]
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError(f"data.messages_field: {where} field {d.messages_field!r} is not a non-empty list of "
                          'messages; give [{"role": "user", "content": "..."}, {"role": "assistant", ...}]')
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise ConfigError(f"{key}: {where} message {j} ({repr(m)[:80]}) lacks a \"role\" or a text \"content\"; "
                              'every message needs {"role": "...", "content": "..."}')
    if d.completion_only_loss and not any(m["role"] == "assistant" for m in msgs):
        raise ConfigError(f"{key}: {where} has no \"assistant\" message, so completion-only loss has nothing to "
                          "learn; add the reply or set data.completion_only_loss false")


def record_pieces(rec, d, template: str | None, specials: dict, eos: str | None) -> list[tuple[str, bool]]:
    """``rec`` as consecutive ``(text, is_completion)`` pieces; their concatenation is the rendered record.
    Chat: every assistant turn (as the template renders it) is a completion; prompt/completion: the
    completion, followed by ``eos`` when given."""
    if d.format == "prompt_completion":
        return [(rec[d.prompt_field], False), (rec[d.completion_field] + (eos or ""), True)]
    msgs = rec[d.messages_field]
    full = _render(template, msgs, specials, False)
    pieces, done = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(template, msgs[:i], specials, True)
        upto = _render(template, msgs[: i + 1], specials, False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
            raise ConfigError("data.chat_template: the template does not render a conversation as a prefix of its "
                              f"continuation (turn {i} changes the text before it), so the assistant's tokens cannot "
                              'be told apart; use a template that appends turns, e.g. data.chat_template "simple"')
        pieces += [(full[done:len(before)], False), (full[len(before):len(upto)], True)]
        done = len(upto)
    pieces.append((full[done:], False))
    return [p for p in pieces if p[0]]


def _render(template: str, msgs: list, specials: dict, generation_prompt: bool) -> str:
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template  # torch-free

    try:
        out, _ = render_jinja_template(conversations=[msgs], chat_template=template,
                                       add_generation_prompt=generation_prompt, **specials)
    except (TemplateError, TypeError, ValueError) as e:
        raise ConfigError(f"data.chat_template: rendering a conversation failed ({type(e).__name__}: {e}); fix the "
                          'template or use a built-in one (data.chat_template "simple")') from None
    return out[0]


def check_instruct_data(r, files) -> None:
    """Before launch (called by :func:`ds_hexamoe.recipes.files.check_data_files`): instruction data has a
    template and its first records (up to 64 MiB a file) have their fields and render; JSON text data
    holds text in ``data.text_field``."""
    d = r.data
    if d.format not in INSTRUCT_FORMATS:
        if files.format == "json":
            _check_text_values(files.train[:1] + (files.validation or [])[:1], d.text_field)
        return
    if files.format not in ("json", "parquet", "csv") or (d.format == "chat" and files.format == "csv"):
        raise ConfigError(f'data.format: "{d.format}" reads JSON lines or parquet records{"" if d.format == "chat" else " (or csv)"}, '
                          f"not {files.format} files: {files.train[0]!r}")
    zebra = getattr(getattr(r.hexamoe_config, "zebra", None), "enabled", False)
    if d.packing and zebra is not False:
        raise ConfigError(f"data.packing: packed {d.format!r} examples are kept apart by their position ids, which "
                          f"the zebra pipeline (hexamoe.zebra.enabled = {zebra!r}) does not pass to attention; set "
                          "data.packing false or hexamoe.zebra.enabled false")
    tok = r.tokenizer_spec
    if tok.build is not None:
        raise ConfigError(f'tokenizer.build: data.format "{d.format}" fine-tunes a model with its own tokenizer; set '
                          "tokenizer.path or model.path instead of training a tokenizer")
    template, specials = None, folder_special_tokens(tok.path)
    if d.format == "chat":
        template = resolve_chat_template(d, tokenizer_folder_template(tok.path), repr(tok.path))
    rendered = 0
    for key, f in [("data.train_files", f) for f in files.train] + [("data.validation_files", f)
                                                                   for f in files.validation or []]:
        for where, rec in _head_records(f, files.format):
            check_record(rec, d, where, key)
            if rendered < RENDER_CHECKED:
                rendered += 1
                try:
                    record_pieces(rec, d, template, specials, specials.get("eos_token"))
                except ConfigError as e:
                    raise ConfigError(f"{e} (rendering {where})") from None


def _head_records(path: str, fmt: str):
    """``(where, record)`` of the records at the start of a file (none for compressed files: the worker checks)."""
    if path.endswith((".gz", ".bz2", ".xz", ".zst", ".lz4")):
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            yield from ((f"{path!r} record {i}", rec) for i, rec in enumerate(batch.to_pylist()))
            return
    if fmt == "csv":
        import csv

        with open(path, newline="", encoding="utf-8") as fh:
            yield from ((f"{path!r} line {i + 2}", rec) for i, rec in enumerate(csv.DictReader(fh)) if i < 10000)
        return
    seen = 0
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            seen += len(line)
            if seen > _SCAN_BYTES or (i == 0 and line.lstrip().startswith("[")):
                return  # past the scan limit, or one JSON array: the worker checks every record
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if i == 0:
                    return  # one pretty-printed object: datasets decides
                raise ConfigError(f"data.train_files: {path!r} line {i + 1} is not JSON ({e.msg}); give one JSON "
                                  "object per line") from None
            yield f"{path!r} line {i + 1}", rec


def _check_text_values(paths: list[str], field: str) -> None:
    for path in paths:
        for where, rec in _head_records(path, "json"):
            value = rec.get(field) if isinstance(rec, dict) else None
            if value is None or isinstance(value, str):
                break
            hint = ('it holds chat messages: set data.format "chat" (data.messages_field names the field)'
                    if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]
                    else "give a field holding text")
            raise ConfigError(f"data.text_field: {field!r} of {where} is a {type(value).__name__}, not text; {hint}")

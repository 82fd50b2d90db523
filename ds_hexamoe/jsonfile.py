"""JSON files the package reads (recipes, devices files, DeepSpeed configs, routing statistics), parsed
strictly: a key given twice in one object is an error naming the dotted key and both lines (Python's
json keeps the last one silently), and a byte that is not UTF-8 is named with its offset and line."""
from __future__ import annotations

import json
import json.decoder
import json.scanner
import os
from typing import Any

from .errors import ConfigError


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Parse a JSON file; a missing file, bytes that are not UTF-8, bad JSON or a key given twice in one object
    (plain JSON would keep the last silently) is a :class:`ConfigError` naming ``what`` (and ``fix``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file {path!r} does not exist; {fix}")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path!r}: not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start} (line "
                          f"{line}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    try:
        return _strict_loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path!r}: invalid JSON ({e})") from None
    except _DuplicateKey as e:
        first, second = (text.count("\n", 0, at) + 1 for at in (e.first, e.second))
        raise ConfigError(f"{what} {path!r}: key {e.dotted()!r} appears twice, at line {first} and line {second}; "
                          "JSON would keep only the last one silently: remove one of them") from None


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):  # offsets in the text; the path grows on the way out
        self.path, self.first, self.second = [key], first, second

    def dotted(self) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path).lstrip(".")


_WS = json.decoder.WHITESPACE.match


def _object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
    """json's object parser, refusing a key seen before in the same object."""
    s, end = s_and_end
    out: dict = {}
    at: dict[str, int] = {}
    end = _WS(s, end).end()
    if s[end:end + 1] == "}":
        return out, end + 1
    while True:
        if s[end:end + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, end)
        start = end
        key, end = json.decoder.scanstring(s, end + 1, strict)
        if key in at:
            raise _DuplicateKey(key, at[key], start)
        at[key] = start
        end = _WS(s, end).end()
        if s[end:end + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", s, end)
        try:
            out[key], end = scan_once(s, _WS(s, end + 1).end())
        except StopIteration as e:
            raise json.JSONDecodeError("Expecting value", s, e.value) from None
        except _DuplicateKey as e:
            e.path.insert(0, key)
            raise
        end = _WS(s, end).end()
        if s[end:end + 1] == "}":
            return out, end + 1
        if s[end:end + 1] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", s, end)
        end = _WS(s, end + 1).end()


def _array(s_and_end, scan_once):
    index = 0

    def each(s, idx):
        nonlocal index
        try:
            return scan_once(s, idx)
        except _DuplicateKey as e:
            e.path.insert(0, index)
            raise
        finally:
            index += 1

    return json.decoder.JSONArray(s_and_end, each)


def _strict_loads(text: str) -> Any:
    dec = json.JSONDecoder()
    dec.parse_object, dec.parse_array = _object, _array
    dec.scan_once = json.scanner.py_make_scanner(dec)
    return dec.decode(text)

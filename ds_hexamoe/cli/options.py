"""Options ``train``, ``validate`` and ``plan`` share: the recipe argument and the ways to override its values."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..config import ConfigError


def add_recipe_args(sp: argparse.ArgumentParser) -> None:
    add_recipe_source_args(sp)
    sp.add_argument("--steps", type=int, help="override training.steps")
    sp.add_argument("--output-dir", help="override training.output_dir")
    sp.add_argument("--master-port", type=int, help="rendezvous port (default: the recipe's, else a free one)")


def add_recipe_source_args(sp: argparse.ArgumentParser) -> None:
    """The recipe, ``--set`` and the rank-count overrides: what ``train``, ``validate`` and ``plan`` share."""
    sp.add_argument("recipe", nargs="?", default=None,
                    help="recipe JSON file (default: the embedded mixtral-tiny-finetune recipe)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="override a recipe value by dotted key, VALUE as JSON (repeatable), e.g. training.lr=3e-4")
    sp.add_argument("--nproc", type=int, help="processes per node (override launcher.nproc)")
    sp.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (override launcher.hostfile)")


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.lr=3e-4")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string
    return out


def overrides_of(args) -> dict[str, Any]:
    """The dotted-key recipe overrides the command line asks for (``--set`` and the shortcuts)."""
    ov = _parse_set(getattr(args, "set", None) or [])
    if getattr(args, "steps", None) is not None:
        ov["training.steps"] = args.steps
    if getattr(args, "output_dir", None) is not None:
        ov["training.output_dir"] = os.path.abspath(args.output_dir)
    if getattr(args, "nproc", None) is not None:
        ov["launcher.nproc"] = args.nproc
    if getattr(args, "hostfile", None) is not None:
        ov["launcher.hostfile"] = os.path.abspath(args.hostfile)
    if getattr(args, "master_port", None) is not None:
        ov["launcher.master_port"] = args.master_port
    return ov

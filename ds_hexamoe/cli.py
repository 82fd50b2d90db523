"""``ds-hexamoe``: train from a recipe, validate one, plan placements, profile routing.

    ds-hexamoe train [RECIPE.json] [--nproc N] [--hostfile H] [--resume | --overwrite] [--steps S]
                     [--output-dir D] [--master-port P] [--set KEY=VALUE ...] [--dry-run]
    ds-hexamoe validate [RECIPE.json] [--set KEY=VALUE ...] [--print]
    ds-hexamoe plan ...                      (ds_hexamoe.placement.cli.plan_main)
    ds-hexamoe profile-routing RECIPE.json ... (ds_hexamoe.placement.cli.profile_main)

``train`` validates the whole recipe (every path included) before it starts anything, then runs
``ds_hexamoe/train.py`` on every rank through DeepSpeed's launcher (``deepspeed --num_gpus N`` or
``--hostfile``). Without a recipe it trains the embedded default (a tiny Mixtral on 2 CPU ranks).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Any

from .config import ConfigError
from .recipes import DEFAULT_RECIPE, Recipe, load_recipe, recipe_json

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "hf", "recipe.json", "tokenizer")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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


def _overrides(args) -> dict[str, Any]:
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


def deepspeed_launcher() -> list[str]:
    """DeepSpeed's ``deepspeed`` launcher of this Python environment."""
    local = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if os.path.isfile(local) and os.access(local, os.X_OK):
        return [local]
    found = shutil.which("deepspeed")
    if found:
        return [found]
    raise ConfigError("launcher: DeepSpeed's `deepspeed` launcher is not installed in this environment; "
                      "pip install deepspeed")


def launch_command(recipe: Recipe, overrides: dict[str, Any], resume: bool, port: int | None = None) -> list[str]:
    """The ``deepspeed ... train.py`` command line that runs ``recipe`` on every rank."""
    from .train import encode_overrides

    lc = recipe.launcher
    cmd = deepspeed_launcher()
    if lc.hostfile is not None:
        cmd += ["--hostfile", lc.hostfile]
    if lc.nproc is not None:
        cmd += ["--num_gpus", str(lc.nproc)]
    if lc.master_addr is not None:
        cmd += ["--master_addr", lc.master_addr]
    cmd += ["--master_port", str(port or lc.master_port or free_port())]
    cmd += list(lc.extra_args)
    cmd += [WORKER]
    if recipe.source is not None:
        cmd += ["--recipe", recipe.source]
    if overrides:
        cmd += ["--overrides", encode_overrides(overrides)]
    if resume:
        cmd += ["--resume"]
    return cmd


def _prepare_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    from .train import read_latest

    out = recipe.output_dir
    latest = read_latest(recipe.checkpoint_dir)
    if resume:
        if latest is None:
            raise ConfigError(f"--resume: no complete checkpoint in {recipe.checkpoint_dir!r} (no 'latest' file); "
                              "run without --resume to start training")
        return
    if latest is not None and not overwrite:
        raise ConfigError(f"training.output_dir: {out!r} already holds checkpoint {latest!r}; pass --resume to continue "
                          "it, --overwrite to start over there, or --output-dir for a new folder")
    if overwrite:
        for name in _OUTPUTS:
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(out, exist_ok=True)


def cmd_train(args) -> int:
    overrides = _overrides(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    recipe = load_recipe(args.recipe, overrides=overrides)
    if recipe.source is None:
        raise ConfigError("recipe: train needs a recipe file")
    cmd = launch_command(recipe, overrides, args.resume)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    _prepare_output_dir(recipe, args.resume, args.overwrite)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    src = recipe.source if args.recipe is not None else f"the embedded default ({DEFAULT_RECIPE})"
    print(f"[ds-hexamoe] training {recipe.name!r} from {src} -> {recipe.output_dir}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # DeepSpeed's runner forwards the interrupt to the ranks; give them time to stop
        try:
            return proc.wait(timeout=30)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            return 130


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, overrides=_overrides(args))
    from .data import resolve_data_files

    data = "see task_options"
    if recipe.data.train_files:
        files = resolve_data_files(recipe)
        data = f"{len(files.train)} {files.format} file(s)"
    model = recipe.model.path or (recipe.model.config or {}).get("model_type", "from config")
    print(f"recipe {recipe.name!r} is valid ({recipe.source or 'inline'})")
    print(f"  task: {recipe.task}; model: {model}; data: {data}; output_dir: {recipe.output_dir}")
    if args.print:
        world = recipe.launcher.nproc
        print(recipe_json(recipe))
        print(json.dumps(recipe.ds_config(world), indent=2))
    return 0


def _delegate(module: str, attr: str, argv: list[str], what: str) -> int:
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            print(f"ds-hexamoe {what}: not available in this installation ({module} is missing)", file=sys.stderr)
            return 2
        raise
    except AttributeError:
        print(f"ds-hexamoe {what}: not available in this installation ({module}.{attr} is missing)", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-hexamoe", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("recipe", nargs="?", default=None,
                        help="recipe JSON file (default: the embedded mixtral-tiny recipe)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a recipe value by dotted key, VALUE as JSON (repeatable), e.g. training.lr=3e-4")
        sp.add_argument("--steps", type=int, help="override training.steps")
        sp.add_argument("--output-dir", help="override training.output_dir")
        sp.add_argument("--nproc", type=int, help="processes per node (override launcher.nproc)")
        sp.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (override launcher.hostfile)")
        sp.add_argument("--master-port", type=int, help="rendezvous port (default: the recipe's, else a free one)")

    t = sub.add_parser("train", help="train from a recipe through DeepSpeed's launcher")
    common(t)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true", help="delete an earlier run's outputs in output_dir first")
    t.add_argument("--dry-run", action="store_true", help="validate and print the launcher command only")
    t.set_defaults(fn=cmd_train)
    v = sub.add_parser("validate", help="check a recipe (keys, values, paths) without running anything")
    common(v)
    v.add_argument("--print", action="store_true", help="print the resolved recipe and DeepSpeed config")
    v.set_defaults(fn=cmd_validate)
    sub.add_parser("plan", help="plan expert placement (see `ds-hexamoe plan --help`)", add_help=False)
    sub.add_parser("profile-routing", help="record routing statistics of a recipe's model", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        return _delegate("ds_hexamoe.placement.cli", "plan_main", argv[1:], "plan")
    if argv and argv[0] == "profile-routing":
        return _delegate("ds_hexamoe.placement.cli", "profile_main", argv[1:], "profile-routing")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"ds-hexamoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

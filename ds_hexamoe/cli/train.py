"""``ds-hexamoe train``: validate the whole recipe (every path included) before starting anything, then run
``ds_hexamoe/train.py`` on every rank through DeepSpeed's launcher (``deepspeed --num_gpus N`` or
``--hostfile``) (docs/design.md, "Recipes, tasks, worker and CLI")."""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from ..config import ConfigError
from ..distributed import free_port
from ..recipes import DEFAULT_RECIPE, Recipe, load_recipe
from .jobs import OutputLock, earlier_outputs, overwrite_plan, remove_outputs, run_job
from .options import add_recipe_args, overrides_of
from .router_check import check_recipe_routers

# the by-path entry DeepSpeed's launcher runs (ds_hexamoe/train.py)
WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


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


def launch_command(recipe: Recipe, overrides: dict[str, Any], resume: bool, port: int | None = None,
                   reshape_schedule: bool = False) -> list[str]:
    """The ``deepspeed ... train.py`` command line that runs ``recipe`` on every rank."""
    from ..worker import encode_overrides  # the worker pulls in torch; plain validation does not need it

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
    if reshape_schedule:
        cmd += ["--reshape-schedule"]
    return cmd


def _prepare_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse a bad ``--resume`` or a plain run into a folder holding an earlier run's outputs; with
    ``--overwrite``, say what is removed and remove only the earlier run's outputs (never an input)."""
    from ..worker import read_latest

    out, ckpt = recipe.output_dir, recipe.checkpoint_dir
    latest = read_latest(ckpt)
    if resume and latest is not None and not os.path.isdir(os.path.join(ckpt, latest)):
        raise ConfigError(f"--resume: {os.path.join(ckpt, 'latest')!r} names checkpoint {latest!r}, but the folder "
                          f"{os.path.join(ckpt, latest)!r} is missing; pass --resume-fallback to resume from the "
                          "newest checkpoint that verifies, restore the folder, or write the tag of a checkpoint that "
                          "exists into 'latest'")
    if resume:
        if latest is None:
            there = earlier_outputs(out)
            raise ConfigError(f"--resume: no complete checkpoint in {ckpt!r} (no 'latest' file)" + (
                f"; it holds {'; '.join(there)}: pass --resume-fallback to resume from the newest checkpoint that "
                "verifies, --overwrite to start over there, or --output-dir for a new folder" if there else
                "; run without --resume to start training"))
        return
    there = earlier_outputs(out)
    if there and not overwrite:
        raise ConfigError(f"training.output_dir: {out!r} already holds an earlier run's outputs ({'; '.join(there)}), "
                          "which a new run would overwrite; pass --resume to continue it (--resume-fallback: from the "
                          "newest checkpoint that verifies), --overwrite to delete them and start over there, or "
                          "--output-dir for a new folder")
    if overwrite:
        remove, keep = overwrite_plan(recipe)
        for p in remove:
            print(f"[ds-hexamoe] --overwrite: removing {p}", flush=True)
        for p in keep:
            print(f"[ds-hexamoe] --overwrite: keeping {p} (the recipe being run; the run rewrites it)", flush=True)
        remove_outputs(remove)


def cmd_train(args) -> int:
    overrides = overrides_of(args)
    if getattr(args, "resume_fallback", False):
        args.resume = True  # --resume-fallback is --resume that may pick an older, verified checkpoint
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    if getattr(args, "reshape_schedule", False) and not args.resume:
        raise ConfigError("--reshape-schedule: it stretches a resumed checkpoint's learning-rate schedule over "
                          "training.steps; pass it with --resume (a new run's schedule spans training.steps anyway)")
    recipe = load_recipe(args.recipe, overrides=overrides)
    if recipe.source is None:
        raise ConfigError("recipe: train needs a recipe file")
    check_recipe_routers(recipe)
    if recipe.peft is not None:
        from ..tasks.peft import check_peft_model  # builds the model on the meta device: torch, transformers

        check_peft_model(recipe)
    if recipe.hexamoe_config is not None and recipe.hexamoe_config.zebra.explicit:
        from ..worker.zebra import check_zebra_model  # builds the model on the meta device: torch, transformers

        check_zebra_model(recipe, recipe.launcher.nproc if recipe.launcher.hostfile is None else None)
    cmd = launch_command(recipe, overrides, args.resume, reshape_schedule=getattr(args, "reshape_schedule", False))
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    os.makedirs(recipe.output_dir, exist_ok=True)
    lock = OutputLock(recipe.output_dir)
    lock.acquire("ds-hexamoe " + " ".join(sys.argv[1:]))
    resumed_from = None
    try:
        if args.resume:  # corrupt checkpoints are refused (or skipped, when asked) before anything starts
            from ..worker.checkpoints import check_before_resume

            resumed_from = check_before_resume(recipe.checkpoint_dir, fallback=getattr(args, "resume_fallback", False),
                                               recipe=recipe)
        _prepare_output_dir(recipe, args.resume, args.overwrite)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        src = recipe.source if args.recipe is not None else f"the embedded default ({DEFAULT_RECIPE})"
        print(f"[ds-hexamoe] training {recipe.name!r} from {src} -> {recipe.output_dir}", flush=True)
        rc = run_job(cmd, env)
        if rc not in (0, 128 + 2, 128 + 15, 128 + 1):  # not a signal the user sent to ds-hexamoe
            from ..worker.checkpoints import after_failure

            print(after_failure(recipe.output_dir, recipe.checkpoint_dir, rc, resumed_from), file=sys.stderr,
                  flush=True)
        return rc
    finally:
        lock.release()


def register(sub) -> None:
    t = sub.add_parser("train", help="train from a recipe through DeepSpeed's launcher")
    add_recipe_args(t)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true", help="delete an earlier run's outputs in output_dir first (checkpoints/, metrics.jsonl, "
                   "summary.json, hf/, tokenizer/; never an input of this run; each removal is printed)")
    t.add_argument("--resume-fallback", action="store_true",
                   help="--resume from the newest checkpoint whose files match its manifest of checksums; newer "
                   "ones that do not are moved aside to <tag>.corrupt")
    t.add_argument("--reshape-schedule", action="store_true",
                   help="with --resume and another --steps: stretch the checkpoint's learning-rate schedule over the "
                   "new training.steps (default: keep it, so steps past its end train at its final rate)")
    t.add_argument("--dry-run", action="store_true", help="validate and print the launcher command only")
    t.set_defaults(fn=cmd_train)

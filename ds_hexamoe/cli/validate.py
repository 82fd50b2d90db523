"""``ds-hexamoe validate``: check a recipe (keys, values, every path) without running anything, reporting every
error found in one pass (exit 2 when there is any)."""
from __future__ import annotations

import json

from ..config import ConfigError
from ..recipes import load_recipe, recipe_json, resolve_data_files
from ..recipes.paths import placeholders
from .options import add_recipe_args, overrides_of
from .router_check import check_recipe_routers


def cmd_validate(args) -> int:
    overrides = overrides_of(args)
    if args.print:
        _print_resolved(args.recipe, overrides)
    recipe = load_recipe(args.recipe, overrides=overrides)
    check_recipe_routers(recipe)
    if recipe.peft is not None:
        from ..tasks.peft import check_peft_model  # builds the model on the meta device: torch, transformers

        check_peft_model(recipe)
    if recipe.hexamoe_config is not None and recipe.hexamoe_config.zebra.explicit:
        from ..worker.zebra import check_zebra_model  # builds the model on the meta device: torch, transformers

        check_zebra_model(recipe, recipe.launcher.nproc if recipe.launcher.hostfile is None else None)
    data = "see task_options"
    if recipe.data.train_files:
        files = resolve_data_files(recipe)
        data = f"{len(files.train)} {files.format} file(s)"
    model = recipe.model.path or (recipe.model.config or {}).get("model_type", "from config")
    print(f"recipe {recipe.name!r} is valid ({recipe.source or 'inline'})")
    print(f"  task: {recipe.task}; model: {model}; data: {data}; output_dir: {recipe.output_dir}")
    if recipe.peft is not None:
        p = recipe.peft
        print(f"  peft: LoRA r={p.r} alpha={p.alpha} on modules {p.target_modules} and parameters "
              f"{p.target_parameters}" + ("; merged export to hf/" if p.export_merged else ""))
    return 0


def _print_resolved(spec, overrides: dict) -> None:
    """The resolved recipe and DeepSpeed config, printed before the input files are checked, so that a
    template with paths still to fill in (recipes/qwen3-moe.json) prints too; those paths are listed."""
    recipe = load_recipe(spec, overrides=overrides, check_files=False)
    print(recipe_json(recipe))
    try:
        print(json.dumps(recipe.ds_config(recipe.launcher.nproc), indent=2))
    except ConfigError as e:  # a DeepSpeed file not there yet; the full check below names it
        print(f"(no DeepSpeed config: {e})")
    holes = placeholders(recipe.to_dict())
    if holes:
        print("paths still to fill in (train refuses this recipe until each names a local file or folder):")
        for key, path in holes:
            print(f"  {key}: {path}")


def register(sub) -> None:
    v = sub.add_parser("validate", help="check a recipe (keys, values, paths) without running anything")
    add_recipe_args(v)
    v.add_argument("--print", action="store_true", help="print the resolved recipe and DeepSpeed config (also for a "
                   "recipe with paths still to fill in, which are listed; the exit code is still 2 for those)")
    v.set_defaults(fn=cmd_validate)

"""``ds-hexamoe validate``: check a recipe (keys, values, every path) without running anything."""
from __future__ import annotations

import json

from ..recipes import load_recipe, recipe_json, resolve_data_files
from .options import add_recipe_args, overrides_of


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, overrides=overrides_of(args))
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


def register(sub) -> None:
    v = sub.add_parser("validate", help="check a recipe (keys, values, paths) without running anything")
    add_recipe_args(v)
    v.add_argument("--print", action="store_true", help="print the resolved recipe and DeepSpeed config")
    v.set_defaults(fn=cmd_validate)

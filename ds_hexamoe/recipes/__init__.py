"""Training recipes: the schema (:mod:`.schema`), loading with overrides (:mod:`.load`), path rules
(:mod:`.paths`), input-file checks and data-file resolution (:mod:`.files`), and what the engine gets
(:mod:`.ds_config`). Nothing here builds a model or imports torch (docs/design.md, "Recipes, tasks,
worker and CLI").
"""
from .ds_config import build_ds_config, lr_lambda
from .files import DataFiles, check_data_files, check_recipe_files, expand_patterns, infer_format, resolve_data_files
from .load import DEFAULT_RECIPE, load_recipe, recipe_json
from .paths import PKG_PREFIX, PLACEHOLDER_PREFIX, resolve_path
from .schema import (CAUSAL_LM, TASKS, DataSpec, LauncherSpec, ModelSpec, PeftSpec, Recipe, TokenizerBuildSpec,
                     TokenizerSpec, TrainingSpec)

__all__ = [
    "CAUSAL_LM", "DEFAULT_RECIPE", "PKG_PREFIX", "PLACEHOLDER_PREFIX", "TASKS", "DataFiles", "DataSpec",
    "LauncherSpec", "ModelSpec", "PeftSpec", "Recipe", "TokenizerBuildSpec", "TokenizerSpec", "TrainingSpec", "build_ds_config",
    "check_data_files", "check_recipe_files", "expand_patterns", "infer_format", "load_recipe", "lr_lambda",
    "recipe_json", "resolve_data_files", "resolve_path",
]

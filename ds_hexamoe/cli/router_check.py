"""Before launch: the ``hexamoe.router`` options a causal-LM recipe asks of its checkpoint's routers are ones
the model supports (a bias update needs a DeepSeek-V3-style correction bias, an auxiliary-loss coefficient a
model with one), checked on the model built on the meta device (no weights read)."""
from __future__ import annotations

from ..recipes import CAUSAL_LM, Recipe


def check_recipe_routers(recipe: Recipe) -> None:
    """Raise the :class:`~ds_hexamoe.config.ConfigError` the worker would raise, naming the key and the model type."""
    cfg = recipe.hexamoe_config.router if recipe.hexamoe_config is not None else None
    if recipe.task != CAUSAL_LM or cfg is None or not (
            cfg.aux_loss_coef is not None or cfg.z_loss_coef > 0 or cfg.bias_update_rate > 0 or cfg.freeze):
        return
    from ..integrations.router_control import check_router_options
    from ..tasks import build_model

    check_router_options(build_model(recipe, None, meta=True), cfg)

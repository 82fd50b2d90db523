"""ds-hexamoe: dropless expert-specific MoE operators, FSSDP and heterogeneity-aware placement.

``import ds_hexamoe`` registers the ``"hexamoe"`` experts implementation with transformers and makes a
plain ``deepspeed.initialize`` honour a ``"hexamoe"`` config section.
"""
from .config import ConfigError, HexaMoEConfig
from .integrations.transformers import register as _register_transformers

__version__ = "0.1.0"

_register_transformers()

# the integration module itself imports deepspeed only inside its functions
from .integrations.deepspeed import build_param_groups, convert_model, initialize  # noqa: E402
from .integrations.deepspeed import install_patch as _install_deepspeed_patch  # noqa: E402

_install_deepspeed_patch()


__all__ = ["ConfigError", "HexaMoEConfig", "initialize", "convert_model", "build_param_groups", "__version__"]

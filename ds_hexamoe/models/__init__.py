"""Models ds-hexamoe builds itself (Swin-MoE by sparse upcycling of a Hugging Face Swin)."""
from .swin_moe import (
    SwinMoEConfig,
    SwinMoEForImageClassification,
    SwinMoEImageClassifierOutput,
    build_swin_moe,
    default_moe_layers,
)

__all__ = ["SwinMoEConfig", "SwinMoEForImageClassification", "SwinMoEImageClassifierOutput", "build_swin_moe",
           "default_moe_layers"]

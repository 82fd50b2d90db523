"""The MoE layer: router, dropless experts (transformers v5 weight layout) and the block."""
from .moe import HexaExperts, MoEBlock, moe_aux_loss
from .router import RouterOutput, TopKRouter

__all__ = ["HexaExperts", "MoEBlock", "RouterOutput", "TopKRouter", "moe_aux_loss"]

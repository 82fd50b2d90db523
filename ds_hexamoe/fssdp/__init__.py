"""FSSDP: fully sharded expert parameters with sparse collectives (DESIGN.md section 3).

Whole-expert ownership (Hecate); per layer and step only the experts some rank's tokens activate move
(SparseAllGather forward, SparseReduceScatter of their gradients back to the owners); a one-layer
pipeline-shared cache with backward prefetch (HEXA-MoE); optional re-materialization in backward; a
sharded AdamW/Adam/SGD for the shards driven by the DeepSpeed engine; checkpoints that re-shard.
"""
from .collectives import CommStats
from .manager import FSSDPManager
from .optim import OptimizerSpec, ShardedOptimizer
from .plan import LayerOwnership, normalized_weights, split_experts

__all__ = ["FSSDPManager", "CommStats", "OptimizerSpec", "ShardedOptimizer", "LayerOwnership",
           "normalized_weights", "split_experts"]

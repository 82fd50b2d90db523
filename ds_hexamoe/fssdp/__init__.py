"""FSSDP: fully sharded expert parameters with sparse collectives (docs/design.md, "FSSDP").

Whole-expert ownership (Hecate); per layer and step only the experts some rank's tokens activate move
(SparseAllGather forward, SparseReduceScatter of their gradients back to the owners); a one-layer
pipeline-shared cache with backward prefetch (HEXA-MoE); forward gathers predicted from each layer's
load history and issued ahead of its router, with calibration gathers (Hecate); load-aware re-ownership;
optional re-materialization in backward; a sharded AdamW/Adam/SGD for the shards driven by the DeepSpeed
engine; checkpoints that re-shard.
"""
from ..parallel.accounting import CommStats
from .lora import peft_adapter_state_dict, save_peft_adapter
from .manager import FSSDPManager
from .optim import OptimizerSpec, ShardedOptimizer
from .ownership import LayerOwnership, normalized_weights, split_experts
from .sharding import is_shard, shard_experts, shard_range

__all__ = ["FSSDPManager", "CommStats", "OptimizerSpec", "ShardedOptimizer", "LayerOwnership",
           "normalized_weights", "split_experts", "is_shard", "shard_experts", "shard_range", "peft_adapter_state_dict",
           "save_peft_adapter"]

"""Expert-parallel and model-centric execution of MoE layers, LSH-compressed dispatch, token accounting.

Each mode takes, per MoE layer call, the local tokens and routing (``hidden[T, d]``,
``top_k_index[T, k]``, ``top_k_weights[T, k]``), a ``materialize`` callable for the weights this rank
computes with, and (expert parallel) a placement ``{expert: [ranks]}``; it returns ``out[T, d]``,
differentiable w.r.t. hidden, routing weights and the materialized weights (docs/design.md, "Execution
modes").
"""
from .accounting import CallStats, CollectiveRecord, TokenAccounting
from .expert_parallel import ExpertParallelMoE
from .lsh import CrossPolytopeLSH, LSHCompressor, bucket_pairs, centroids
from .model_centric import ModelCentricMoE
from .data_centric import DataCentricMoE
from .registry import MODE_BUILDERS, ParallelMoE, register_mode
from .replicas import PlacementTables, assign_destinations, placement_weights, validate_placement
from .weights import ExpertSpec, ExpertWeights, Materialize, ReplicatedExperts, split_hidden

__all__ = [
    "CallStats", "CollectiveRecord", "MODE_BUILDERS", "register_mode", "CrossPolytopeLSH", "DataCentricMoE", "ExpertParallelMoE", "ExpertSpec",
    "ExpertWeights", "LSHCompressor", "Materialize", "ModelCentricMoE", "ParallelMoE", "PlacementTables",
    "ReplicatedExperts", "TokenAccounting", "assign_destinations", "bucket_pairs", "centroids", "placement_weights",
    "split_hidden", "validate_placement",
]

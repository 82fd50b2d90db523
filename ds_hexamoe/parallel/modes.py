"""The three execution modes behind one call signature, chosen from the ``"hexamoe"`` config.

``data_centric`` is the no-token-movement baseline: every rank runs its own tokens through the experts
it materializes (all of them here; FSSDP materializes the active ones), and the weight gradients are
reduced by the caller (DDP all-reduce, or FSSDP's SparseReduceScatter).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import HexaMoEConfig
from .accounting import TokenAccounting
from .common import check_routing, compute_experts
from .expert_parallel import ExpertParallelMoE
from .model_centric import ModelCentricMoE
from .plan import Placement
from .weights import ExpertSpec, Materialize


class DataCentricMoE:
    """Local dropless experts on local tokens; no collective in the layer."""

    mode = "data_centric"

    def __init__(self, spec: ExpertSpec, *, accounting: TokenAccounting | None = None):
        self.spec = spec
        self.accounting = accounting if accounting is not None else TokenAccounting()

    def __call__(self, hidden, top_k_index, top_k_weights, materialize: Materialize, layer: int | None = None) -> torch.Tensor:
        spec = self.spec
        check_routing(hidden, top_k_index, top_k_weights, spec.num_experts)
        counts = torch.bincount(top_k_index.reshape(-1).to(torch.int64), minlength=spec.num_experts)
        stats = self.accounting.new_call(self.mode, layer, hidden.size(0), top_k_index.numel(), counts.tolist())
        stats.rows_computed = top_k_index.numel()
        weights = materialize(list(range(spec.num_experts)), None)
        weights.check(spec.num_experts, hidden.size(1), spec.f1, spec.ffn_dim, "materialize(all experts, None)")
        return compute_experts(hidden, top_k_index, top_k_weights, weights, spec)


class ParallelMoE:
    """``moe(hidden, top_k_index, top_k_weights, materialize, placement=None, layer=None) -> [T, d]``.

    Built from the config's ``mode`` and ``lsh`` sections; ``placement`` is required in
    ``expert_parallel`` mode and may change on every call.
    """

    def __init__(
        self,
        spec: ExpertSpec,
        mode: str = "expert_parallel",
        *,
        group=None,
        speeds: Sequence[float] | None = None,
        lsh=None,
        ranks_per_node: int | None = None,
        measure_lsh_error: bool = False,
        accounting: TokenAccounting | None = None,
    ):
        self.accounting = accounting if accounting is not None else TokenAccounting()
        if mode == "expert_parallel":
            self.impl = ExpertParallelMoE(spec, group=group, ranks_per_node=ranks_per_node, lsh=lsh,
                                          measure_lsh_error=measure_lsh_error, accounting=self.accounting)
        elif mode == "model_centric":
            if lsh is not None and lsh.enabled:
                raise ValueError('hexamoe.lsh.enabled: got true with mode "model_centric"; LSH compresses the expert-parallel all-to-all only')
            self.impl = ModelCentricMoE(spec, group=group, speeds=speeds, accounting=self.accounting)
        elif mode == "data_centric":
            self.impl = DataCentricMoE(spec, accounting=self.accounting)
        else:
            raise ValueError(f'hexamoe.mode: got {mode!r}; expected "data_centric", "expert_parallel" or "model_centric" '
                             '("auto" is resolved per layer by the planner before building the layer)')
        self.mode = mode

    @classmethod
    def from_config(cls, config: HexaMoEConfig, spec: ExpertSpec, **kw) -> ParallelMoE:
        return cls(spec, config.mode, lsh=config.lsh, **kw)

    def __call__(self, hidden, top_k_index, top_k_weights, materialize: Materialize,
                 placement: Placement | None = None, layer: int | None = None) -> torch.Tensor:
        if self.mode == "expert_parallel":
            if placement is None:
                raise ValueError('placement: required in "expert_parallel" mode; pass {expert: [ranks]} for this layer')
            return self.impl(hidden, top_k_index, top_k_weights, placement, materialize, layer)
        return self.impl(hidden, top_k_index, top_k_weights, materialize, layer)

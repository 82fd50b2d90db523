"""The execution-mode registry: how one MoE layer call runs, chosen by name (``hexamoe.mode``).

Modes register a builder with :func:`register_mode` (as placement solvers do with ``register_solver``);
:class:`ParallelMoE` is the one call signature in front of them (docs/design.md, "Execution modes").
``"auto"`` is not a mode here: the planner resolves it per layer before layers are built.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import HexaMoEConfig
from .accounting import TokenAccounting
from .data_centric import DataCentricMoE
from .expert_parallel import ExpertParallelMoE
from .model_centric import ModelCentricMoE
from .replicas import Placement
from .weights import ExpertSpec, Materialize

# name -> builder(spec, *, group, speeds, lsh, ranks_per_node, measure_lsh_error, accounting) -> layer callable
MODE_BUILDERS: dict[str, Callable] = {}


def register_mode(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``builder`` as execution mode ``name`` (a later registration replaces it)."""
    def deco(builder: Callable) -> Callable:
        MODE_BUILDERS[name] = builder
        return builder

    return deco


@register_mode("data_centric")
def _data_centric(spec: ExpertSpec, *, accounting: TokenAccounting, **_):
    return DataCentricMoE(spec, accounting=accounting)


@register_mode("expert_parallel")
def _expert_parallel(spec: ExpertSpec, *, group, lsh, ranks_per_node, measure_lsh_error, accounting, **_):
    return ExpertParallelMoE(spec, group=group, ranks_per_node=ranks_per_node, lsh=lsh,
                             measure_lsh_error=measure_lsh_error, accounting=accounting)


@register_mode("model_centric")
def _model_centric(spec: ExpertSpec, *, group, speeds, lsh, accounting, **_):
    if lsh is not None and lsh.enabled:
        raise ValueError('hexamoe.lsh.enabled: got true with mode "model_centric"; LSH compresses the expert-parallel all-to-all only')
    return ModelCentricMoE(spec, group=group, speeds=speeds, accounting=accounting)


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
        if mode not in MODE_BUILDERS:
            names = ", ".join(f'"{m}"' for m in MODE_BUILDERS)
            raise ValueError(f'hexamoe.mode: got {mode!r}; expected one of {names} '
                             '("auto" is resolved per layer by the planner before building the layer)')
        self.impl = MODE_BUILDERS[mode](spec, group=group, speeds=speeds, lsh=lsh, ranks_per_node=ranks_per_node,
                                        measure_lsh_error=measure_lsh_error, accounting=self.accounting)
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

"""The mode table: execution modes of FSSDP-managed layers, switchable per layer between steps
(docs/design.md, "Execution modes").

FSSDP consumes plans, it does not make them or keep them: :meth:`ModeTable.apply_plan` takes any object
with ``modes``, ``placement``, ``token_fractions`` and ``hidden_slices`` (the planner's ``Plan``) and keeps
only what it applied: per-layer modes, expert-parallel placements and model-centric speeds.
"""
from __future__ import annotations

import torch

from ..config import EXEC_MODES, HexaMoEConfig
from ..experts.forward import record_routing
from .execution import (PlacedMaterializer, SliceMaterializer, SlicePlan, agree, default_placement, expert_spec,
                        normalize_placement, placement_transfer)
from .layer import ExpertLayer
from .materializer import Materializer
from .schedule import GatherSchedule
from .shard_store import ShardStore
from .telemetry import StepTelemetry


class ModeTable:
    """Per-layer modes, expert-parallel placements, model-centric speeds, and the ParallelMoE per (layer, mode)."""

    def __init__(self, cfg: HexaMoEConfig, store: ShardStore, materializer: Materializer, telemetry: StepTelemetry,
                 gathers: GatherSchedule, speeds=None):
        self._cfg, self._store, self._mat, self._telemetry = cfg, store, materializer, telemetry
        # the load windows (re-ownership, "hecate" placements) and the gathers issued ahead
        self._gathers = gathers
        initial = "data_centric" if cfg.mode == "auto" else cfg.mode
        self._modes: dict[int, str] = {layer.index: initial for layer in store.layers}
        self._placements: dict[int, dict[int, list[int]]] = {}
        self._moes: dict[tuple[int, str], object] = {}
        self._slice_plans: dict = {}
        self._transfers: dict = {}
        self._speeds: list[float] | None = None if speeds is None else [float(v) for v in speeds]

    def mode(self, layer_index: int) -> str:
        return self._modes[layer_index]

    def modes(self) -> dict[str, str]:
        """``{layer name: mode}`` in effect for the next forward."""
        return {layer.name: self._modes[layer.index] for layer in self._store.layers}

    def replicated_experts(self) -> dict[str, int]:
        """``{layer name: extra expert copies}`` of the layers with a placement of their own."""
        return {layer.name: sum(len(r) - 1 for r in self._placements[layer.index].values())
                for layer in self._store.layers if layer.index in self._placements}

    def forget_layouts(self) -> None:
        """Drop the transfers and slice plans built on the current ownership (re-sharding changes it)."""
        self._transfers.clear()
        self._slice_plans.clear()

    def run(self, layer: ExpertLayer, mode: str, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts forward of a layer in ``expert_parallel`` / ``model_centric`` mode (ParallelMoE)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx = top_k_index.reshape(x.size(0), -1)
        w = top_k_weights.reshape(x.size(0), -1)
        record_routing(layer.module, idx, layer.num_experts, fallback_name=layer.name)
        self._mat.synchronize()
        ahead = self._gathers.take_ahead(layer) if mode == "hecate" else None
        self._gathers.record_loads(layer, torch.bincount(idx.reshape(-1), minlength=layer.num_experts))
        moe = self._moe(layer, mode)
        if mode in ("expert_parallel", "hecate"):
            if ahead is not None:
                placement = ahead.placement
            else:  # "hecate" before any load window: every expert on its owner
                placement = self.placement(layer.index) if mode == "expert_parallel" else default_placement(layer)
            key = tuple(tuple(placement[e]) for e in range(layer.num_experts))
            tk = (layer.index, layer.ownership.experts, key)  # ownership may change (re-sharding)
            if tk not in self._transfers:
                if len(self._transfers) > 64:  # "hecate" placements change every iteration
                    self._transfers.clear()
                self._transfers[tk] = placement_transfer(layer, key, self._store.rank)
            mat = PlacedMaterializer(self._mat, layer, self._transfers[tk], ahead=ahead, gathers=self._gathers)
            out = moe(x, idx, w, mat, placement=placement, layer=layer.index)
        else:
            self._mat.forget_forward_call()
            plan = self._slice_plan(layer, moe.impl.spec, moe.impl.f_sizes)
            mat = SliceMaterializer(self._store, self._telemetry, layer, plan)
            out = moe(x, idx, w, mat, layer=layer.index)
        return out.to(hidden_states.dtype).view(shape)

    def _moe(self, layer: ExpertLayer, mode: str):
        key = (layer.index, mode)
        if key not in self._moes:
            from ..parallel import ParallelMoE

            spec = expert_spec(layer)
            lsh = self._cfg.lsh if mode == "expert_parallel" else None
            impl = "expert_parallel" if mode == "hecate" else mode  # Hecate executes expert-parallel
            self._moes[key] = ParallelMoE(spec, impl, group=self._store.group, speeds=self._speeds, lsh=lsh,
                                          measure_lsh_error=self._cfg.lsh.measure_error if lsh is not None else False,
                                          accounting=self._telemetry.accounting)
        return self._moes[key]

    def _slice_plan(self, layer: ExpertLayer, spec, f_sizes) -> SlicePlan:
        key = (layer.index, tuple(f_sizes))
        if key not in self._slice_plans:
            self._slice_plans[key] = SlicePlan(layer, spec, f_sizes)
        return self._slice_plans[key]

    def _agree(self, what: str, value) -> None:
        agree(what, value, self._store.group, self._telemetry.stats)

    def set_modes(self, modes, *, check: bool = True) -> None:
        """Set the execution mode per layer (``{name or index: mode}``, or one mode string for every layer).

        A collective (every rank passes the same modes; raises on every rank otherwise). Takes effect on the
        next forward; a forward already run keeps its own mode through its backward.
        """
        if isinstance(modes, str):
            modes = {layer.index: modes for layer in self._store.layers}
        if not isinstance(modes, dict):
            raise ValueError(f"set_modes: got {type(modes).__name__}; expected {{layer name or index: mode}} or a mode")
        new = {}
        for which, mode in modes.items():
            layer = self._store.layer(which)
            if mode not in EXEC_MODES:
                raise ValueError(f"set_modes[{layer.name!r}]: got {mode!r}; expected one of {list(EXEC_MODES)}")
            if mode != "data_centric":
                expert_spec(layer)
            new[layer.index] = mode
        if check:
            self._agree("set_modes", sorted(new.items()))
        self._modes.update(new)

    def placement(self, which) -> dict[int, list[int]]:
        """``{expert: [ranks]}`` an expert-parallel forward of layer ``which`` hosts experts by."""
        layer = self._store.layer(which)
        p = self._placements.get(layer.index)
        return p if p is not None else default_placement(layer)

    def set_placement(self, which, placement=None, *, check: bool = True) -> None:
        """Host layer ``which``'s experts per ``placement`` (``{expert: [ranks]}``, replicas allowed, or
        ``{expert: {rank: token fraction}}`` for unequal replicas; None: every expert on its FSSDP owner) from
        the next forward on. A collective (same placement on every rank).
        Replicas are gathered from the owners' shards; their gradients return to the owners."""
        layer = self._store.layer(which)
        p = None if placement is None else normalize_placement(placement, layer, self._store.world_size)
        if check:
            self._agree(f"set_placement({layer.name!r})", p)
        if p is None or p == default_placement(layer):
            self._placements.pop(layer.index, None)
        else:
            self._placements[layer.index] = p

    def set_speeds(self, speeds=None, *, check: bool = True) -> None:
        """Relative per-rank speeds sizing the model-centric hidden slices (None: equal). A collective."""
        world = self._store.world_size
        if speeds is not None:
            speeds = [float(v) for v in speeds]
            if len(speeds) != world or any(v < 0 for v in speeds) or sum(speeds) <= 0:
                raise ValueError(f"set_speeds: got {speeds}; expected {world} numbers >= 0 with a positive sum")
        if check:
            self._agree("set_speeds", speeds)
        self._speeds = speeds
        for (_, mode), moe in self._moes.items():
            if mode == "model_centric":
                moe.impl.set_speeds(speeds)

    def apply_plan(self, plan, *, check: bool = True) -> None:
        """Apply a plan (any object with ``modes``, ``placement``, ``token_fractions`` and ``hidden_slices``, as
        the planner's ``Plan``): per-layer modes, expert-parallel placements (replicas) and model-centric
        hidden slices. Shard ownership stays (re-sharding is a separate step). A collective. The plan itself
        is not kept: its owner is the runtime."""
        world = self._store.world_size
        names = {layer.name for layer in self._store.layers}
        unknown = [n for n in list(plan.modes) + list(plan.placement) if n not in names]
        if unknown:
            raise ValueError(f"apply_plan: plan layer {unknown[0]!r} is not an experts module of this model; "
                             f"expected names from {sorted(names)} (plan from this model's routing statistics)")
        if len(plan.hidden_slices) != world:
            raise ValueError(f"apply_plan: plan is for {len(plan.hidden_slices)} ranks, this job has {world}")
        # experts split between replicas take the plan's token fractions (the split it scored)
        placements = {}
        for n, p in plan.placement.items():
            fr = plan.token_fractions.get(n, {})
            p = {e: ({r: fr[e][r] for r in ranks} if len(ranks) > 1 and e in fr and all(r in fr[e] for r in ranks)
                     else ranks) for e, ranks in p.items()}
            placements[n] = normalize_placement(p, self._store.layer(n), world)
        if check:
            self._agree("apply_plan", (sorted(plan.modes.items()), sorted(placements.items()), plan.hidden_slices))
        self.set_modes(dict(plan.modes), check=False)
        for n, p in placements.items():
            self.set_placement(n, p, check=False)
        self.set_speeds([max(0, hi - lo) for lo, hi in plan.hidden_slices], check=False)

"""FSSDPManager: fully sharded expert parameters, materialized sparsely per layer and step.

Usage (what ``ds_hexamoe.initialize`` does)::

    manager = FSSDPManager.shard_model(model, hexamoe_cfg)     # after dist init, before deepspeed.initialize
    dense = [p for p in model.parameters() if p.requires_grad and not manager.owns(p)]
    engine, opt, dl, sched = deepspeed.initialize(..., model=model, model_parameters=dense)
    manager.attach(engine, optimizer_config=ds_config.get("optimizer"), lr_scheduler=sched)
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, HexaMoEConfig
from ..integrations.transformers import IMPLEMENTATION, experts_modules
from .cache import CallRecord, PipelineCache
from .collectives import (CommStats, Pending, Transfer, exchange_masks, plan_transfer, sparse_all_gather,
                          sparse_reduce_scatter)
from .layer import WEIGHT_KEYS, ExpertLayer, module_weight_names
from .modes import (MODES, PlacedMaterializer, SliceMaterializer, SlicePlan, agree, check_parallel_module,
                    default_placement, expert_spec, normalize_placement, placement_transfer)
from .optim import ShardedOptimizer
from .plan import normalized_weights, split_experts


class _Materialize(torch.autograd.Function):
    """Forward: SparseAllGather of one layer into ``dest``. Backward: SparseReduceScatter to the owners."""

    @staticmethod
    def forward(ctx, mgr, layer, transfer, dest, *shards):
        ctx.set_materialize_grads(False)
        full = layer.full_views(dest)
        sparse_all_gather(layer, transfer, full, mgr.group, mgr.stats).wait()
        ctx.mgr, ctx.layer, ctx.transfer = mgr, layer, transfer
        ctx.record = mgr._forward_record
        return tuple(full[n] for n in layer.param_names)

    @staticmethod
    def backward(ctx, *grads):
        mgr, layer = ctx.mgr, ctx.layer
        if ctx.record is not None:
            ctx.record.done = True
        mgr._reduce_grads(layer, ctx.transfer, dict(zip(layer.param_names, grads)))
        return (None,) * (4 + len(layer.param_names))


class _Handle:
    """What autograd keeps for a cached weight under re-materialization: where it lives, not its data."""

    __slots__ = ("record", "size", "stride", "offset")

    def __init__(self, record, t):
        self.record, self.size, self.stride, self.offset = record, t.size(), t.stride(), t.storage_offset()


class FSSDPManager:
    """Owns the expert shards of every MoE layer of one model on this rank (see module docstring)."""

    def __init__(self, model: nn.Module, layers: list[ExpertLayer], cfg: HexaMoEConfig, group):
        self.model, self.layers, self.cfg, self.group = model, layers, cfg, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.rematerialize, self.prefetch = cfg.rematerialize, cfg.prefetch
        numel = max((layer.full_numel for layer in layers), default=0)
        self.cache = PipelineCache(numel=numel, num_slots=2 if (self.prefetch and self.rematerialize) else 1)
        self.stats, self.last_step_stats = CommStats(), CommStats()
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self.optimizer: ShardedOptimizer | None = None
        self.engine = None
        self._ids = {id(p) for layer in layers for p in layer.shards.values()}
        self._forward_record: CallRecord | None = None
        self._records: list[weakref.ref] = []
        self._seq = 0
        self._bwd_turn = 0
        self._pending: list[Pending] = []
        self._callback_queued = False
        self._scaled_norm = None  # set by the norm hook during engine.step
        # execution modes (DESIGN.md section 4): per layer, switchable between steps
        from ..parallel.accounting import TokenAccounting

        initial = "data_centric" if cfg.mode == "auto" else cfg.mode
        self._modes: dict[int, str] = {layer.index: initial for layer in layers}
        self._placements: dict[int, dict[int, list[int]]] = {}
        self._moes: dict[tuple[int, str], object] = {}
        self._slice_plans: dict = {}
        self._transfers: dict = {}
        self._speeds: list[float] | None = _declared_speeds(cfg, self.world_size)
        self.accounting = TokenAccounting(history=1 << 16)
        self._last_step_calls: list = []
        self.plan = None  # the last Plan applied (apply_plan / replan)
        for layer in layers:
            self._install(layer)

    # ----------------------------------------------------------------------------------- sharding
    @classmethod
    def shard_model(cls, model: nn.Module, cfg: HexaMoEConfig, group=None) -> FSSDPManager:
        """Replace every experts module's full 3-D parameters by this rank's whole-expert shards."""
        if not dist.is_initialized():
            raise RuntimeError("FSSDPManager.shard_model: torch.distributed is not initialized; call "
                               'deepspeed.init_distributed("gloo"|"nccl") first')
        if cfg.sharding != "fssdp":
            raise ConfigError(f'hexamoe.sharding: got {cfg.sharding!r}; set "fssdp" to shard experts with FSSDP')
        world = dist.get_world_size(group)
        weights = normalized_weights(cfg.shard_weights, world)
        found = experts_modules(model)
        if not found:
            raise ConfigError(f"hexamoe.sharding: model {type(model).__name__} has no MoE experts module to shard; "
                              'set "sharding": "none" or pass an MoE model')
        for name, m in found:  # every module is checked before any is changed
            cls._check_module(name, m)
            if cfg.mode in ("expert_parallel", "model_centric"):
                check_parallel_module(name, m)
        # a dedicated group keeps FSSDP's (possibly asynchronous) collectives apart from DeepSpeed's
        group = group if group is not None else dist.new_group(list(range(world)))
        rank = dist.get_rank(group)
        layers = [cls._shard_module(i, name, m, rank, weights) for i, (name, m) in enumerate(found)]
        return cls(model, layers, cfg, group)

    @staticmethod
    def _check_module(name: str, module: nn.Module) -> None:
        impl = getattr(getattr(module, "config", None), "_experts_implementation", IMPLEMENTATION)
        if impl != IMPLEMENTATION:
            raise ConfigError(f"hexamoe.sharding: experts module {name!r} runs the {impl!r} experts implementation; "
                              f'load the model with experts_implementation="{IMPLEMENTATION}" (or call '
                              f'model.set_experts_implementation("{IMPLEMENTATION}")) before FSSDP sharding')
        names = module_weight_names(module)
        full = {k: getattr(module, n, None) for k, n in names.items()}
        missing = [names[k] for k, p in full.items() if not isinstance(p, nn.Parameter)]
        if missing:
            raise ConfigError(f"hexamoe.sharding: experts module {name!r} has no parameter {missing[0]!r}")
        if any(getattr(p, "_hexamoe_fssdp", False) for p in full.values()):
            raise ConfigError(f"hexamoe.sharding: experts module {name!r} is already FSSDP-sharded")
        num_experts = full["w1"].size(0)
        if any(p.size(0) != num_experts for p in full.values()):
            raise ConfigError(f"hexamoe.sharding: experts module {name!r} has parameters with different expert counts")

    @staticmethod
    def _shard_module(i: int, name: str, module: nn.Module, rank: int, weights: list[float]) -> ExpertLayer:
        names = module_weight_names(module)
        full = {k: getattr(module, n) for k, n in names.items()}
        num_experts = full["w1"].size(0)
        own = split_experts(num_experts, weights, layer=i)
        layer = ExpertLayer(index=i, name=name, module=module, ownership=own, rank=rank, names=names,
                            expert_shapes={names[k]: tuple(p.shape[1:]) for k, p in full.items()})
        lo, hi = own.starts[rank], own.starts[rank + 1]
        for k, p in full.items():
            shard = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
            shard._hexamoe_fssdp = True
            shard.ds_optim_param = True  # unique per rank: DeepSpeed must not broadcast it from rank 0
            shard._hexamoe_experts = (lo, hi)
            del module._parameters[names[k]]
            module.register_parameter(names[k], shard)
            layer.shards[names[k]] = shard
        if getattr(module, "num_experts", None) is None:
            module.num_experts = num_experts
        return layer

    def owns(self, p: torch.Tensor) -> bool:
        """True for the expert shard parameters FSSDP steps itself (keep them out of DeepSpeed's optimizer)."""
        return id(p) in self._ids

    def shard_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.shards.values()]

    def _install(self, layer: ExpertLayer) -> None:
        module = layer.module
        module._hexamoe_weights = functools.partial(self._provide, layer)
        module._hexamoe_fssdp_layer = layer
        inner = module.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            mode = self._modes[layer.index]
            run = inner if mode == "data_centric" else functools.partial(self._parallel_forward, layer, mode)
            if self.rematerialize and torch.is_grad_enabled():
                with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                    return run(*args, **kwargs)
            return run(*args, **kwargs)

        module.forward = forward
        module.register_state_dict_post_hook(functools.partial(_drop_shards, layer))
        module.register_load_state_dict_pre_hook(functools.partial(_load_full_into_shards, layer))
        module.register_load_state_dict_post_hook(functools.partial(_forgive_missing_shards, layer))
        for n, p in layer.shards.items():
            self.grads[(layer.index, n)] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    # ---------------------------------------------------------------------------- materialization
    def _provide(self, layer: ExpertLayer, index) -> dict[str, torch.Tensor | None]:
        """``module._hexamoe_weights(index)``: full-expert-count weights, valid for the experts ``index`` uses."""
        if index is None:
            raise RuntimeError(f"FSSDP experts module {layer.name!r} needs the routing index to materialize weights")
        self.synchronize()
        masks = exchange_masks(index.counts > 0, self.group, self.stats)
        transfer = plan_transfer(layer.ownership, masks, self.rank)
        full = self._materialize_transfer(layer, transfer)
        return {k: (full[layer.names[k]] if k in layer.names else None) for k in WEIGHT_KEYS}

    def _materialize_transfer(self, layer: ExpertLayer, transfer: Transfer) -> dict[str, torch.Tensor]:
        """``{param name: [E, ...]}`` full-layer views holding (at least) the experts ``transfer`` brings here;
        backward reduce-scatters their gradients to the owners (and re-gathers them under rematerialize)."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in layer.shards.values())
        self._forward_record = None
        if grad and not self.rematerialize:
            dest = torch.zeros(layer.full_numel, dtype=layer.dtype, device=layer.device)  # kept by autograd
        else:
            slot = self.cache.slot(0, layer.dtype, layer.device)
            record = None
            if grad:
                self._seq += 1
                record = CallRecord(layer=layer, transfer=transfer, seq=self._seq)
                self._records = [r for r in self._records if r() is not None and not r().done]
                self._records.append(weakref.ref(record))
            slot.claim(record)
            self._forward_record = record
            dest = slot.buf
        shards = [layer.shards[n] for n in layer.param_names]
        outs = _Materialize.apply(self, layer, transfer, dest, *shards)
        return dict(zip(layer.param_names, outs))

    # ------------------------------------------------------------------- expert parallel / model centric
    def _parallel_forward(self, layer: ExpertLayer, mode: str, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts forward of a layer in ``expert_parallel`` / ``model_centric`` mode (ParallelMoE)."""
        from ..integrations.transformers import _stats_collector

        module = layer.module
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx = top_k_index.reshape(x.size(0), -1)
        w = top_k_weights.reshape(x.size(0), -1)
        module._hexamoe_last_counts = torch.bincount(idx.reshape(-1).to(torch.int64).clamp(0, layer.num_experts),
                                                     minlength=layer.num_experts + 1)[: layer.num_experts]
        collector = _stats_collector()
        if collector is not None:
            collector.record(getattr(module, "_hexamoe_name", None) or layer.name, idx, layer.num_experts)
        self.synchronize()
        moe = self._moe(layer, mode)
        if mode == "expert_parallel":
            placement = self.placement(layer.index)
            key = tuple(tuple(placement[e]) for e in range(layer.num_experts))
            tk = (layer.index, layer.ownership.starts, key)  # ownership may change (re-sharding)
            if tk not in self._transfers:
                self._transfers[tk] = placement_transfer(layer, key, self.rank)
            mat = PlacedMaterializer(self, layer, self._transfers[tk])
            out = moe(x, idx, w, mat, placement=placement, layer=layer.index)
        else:
            self._forward_record = None
            mat = SliceMaterializer(self, layer, moe.impl.spec, moe.impl.f_sizes)
            out = moe(x, idx, w, mat, layer=layer.index)
        return out.to(hidden_states.dtype).view(shape)

    def _moe(self, layer: ExpertLayer, mode: str):
        key = (layer.index, mode)
        if key not in self._moes:
            from ..parallel import ParallelMoE

            spec = expert_spec(layer)
            lsh = self.cfg.lsh if mode == "expert_parallel" else None
            self._moes[key] = ParallelMoE(spec, mode, group=self.group, speeds=self._speeds, lsh=lsh,
                                          measure_lsh_error=self.cfg.lsh.measure_error if lsh is not None else False,
                                          accounting=self.accounting)
        return self._moes[key]

    def _slice_plan(self, layer: ExpertLayer, spec, f_sizes) -> SlicePlan:
        key = (layer.index, tuple(f_sizes))
        if key not in self._slice_plans:
            self._slice_plans[key] = SlicePlan(layer, spec, f_sizes)
        return self._slice_plans[key]

    def _layer(self, which) -> ExpertLayer:
        if isinstance(which, ExpertLayer):
            return which
        if isinstance(which, int) and not isinstance(which, bool):
            if 0 <= which < len(self.layers):
                return self.layers[which]
        elif isinstance(which, str):
            for layer in self.layers:
                if layer.name == which:
                    return layer
        names = [layer.name for layer in self.layers]
        raise KeyError(f"layer: got {which!r}; expected an index in [0, {len(self.layers)}) or one of {names}")

    def modes(self) -> dict[str, str]:
        """``{layer name: mode}`` in effect for the next forward."""
        return {layer.name: self._modes[layer.index] for layer in self.layers}

    def set_modes(self, modes, *, check: bool = True) -> None:
        """Set the execution mode per layer (``{name or index: mode}``, or one mode string for every layer).

        A collective (every rank passes the same modes; raises on every rank otherwise). Takes effect on the
        next forward; a forward already run keeps its own mode through its backward.
        """
        if isinstance(modes, str):
            modes = {layer.index: modes for layer in self.layers}
        if not isinstance(modes, dict):
            raise ValueError(f"set_modes: got {type(modes).__name__}; expected {{layer name or index: mode}} or a mode")
        new = {}
        for which, mode in modes.items():
            layer = self._layer(which)
            if mode not in MODES:
                raise ValueError(f"set_modes[{layer.name!r}]: got {mode!r}; expected one of {list(MODES)}")
            if mode != "data_centric":
                expert_spec(layer)
            new[layer.index] = mode
        if check:
            agree(self, "set_modes", sorted(new.items()))
        self._modes.update(new)

    def placement(self, which) -> dict[int, list[int]]:
        """``{expert: [ranks]}`` an expert-parallel forward of layer ``which`` hosts experts by."""
        layer = self._layer(which)
        p = self._placements.get(layer.index)
        return p if p is not None else default_placement(layer)

    def set_placement(self, which, placement=None, *, check: bool = True) -> None:
        """Host layer ``which``'s experts per ``placement`` (``{expert: [ranks]}``, replicas allowed, or
        ``{expert: {rank: token fraction}}`` for unequal replicas; None: every expert on its FSSDP owner) from
        the next forward on. A collective (same placement on every rank).
        Replicas are gathered from the owners' shards; their gradients return to the owners."""
        layer = self._layer(which)
        p = None if placement is None else normalize_placement(placement, layer, self.world_size)
        if check:
            agree(self, f"set_placement({layer.name!r})", p)
        if p is None or p == default_placement(layer):
            self._placements.pop(layer.index, None)
        else:
            self._placements[layer.index] = p

    def set_speeds(self, speeds=None, *, check: bool = True) -> None:
        """Relative per-rank speeds sizing the model-centric hidden slices (None: equal). A collective."""
        if speeds is not None:
            speeds = [float(v) for v in speeds]
            if len(speeds) != self.world_size or any(v < 0 for v in speeds) or sum(speeds) <= 0:
                raise ValueError(f"set_speeds: got {speeds}; expected {self.world_size} numbers >= 0 with a positive sum")
        if check:
            agree(self, "set_speeds", speeds)
        self._speeds = speeds
        for (_, mode), moe in self._moes.items():
            if mode == "model_centric":
                moe.impl.set_speeds(speeds)

    def apply_plan(self, plan, *, check: bool = True) -> None:
        """Apply a :class:`~ds_hexamoe.placement.Plan`: per-layer modes, expert-parallel placements (replicas) and
        model-centric hidden slices. Shard ownership stays (re-sharding is a separate step). A collective."""
        names = {layer.name for layer in self.layers}
        unknown = [n for n in list(plan.modes) + list(plan.placement) if n not in names]
        if unknown:
            raise ValueError(f"apply_plan: plan layer {unknown[0]!r} is not an experts module of this model; "
                             f"expected names from {sorted(names)} (plan from this model's routing statistics)")
        if len(plan.hidden_slices) != self.world_size:
            raise ValueError(f"apply_plan: plan is for {len(plan.hidden_slices)} ranks, this job has {self.world_size}")
        # experts split between replicas take the plan's token fractions (the split it scored)
        placements = {}
        for n, p in plan.placement.items():
            fr = plan.token_fractions.get(n, {})
            p = {e: ({r: fr[e][r] for r in ranks} if len(ranks) > 1 and e in fr and all(r in fr[e] for r in ranks)
                     else ranks) for e, ranks in p.items()}
            placements[n] = normalize_placement(p, self._layer(n), self.world_size)
        if check:
            agree(self, "apply_plan", (sorted(plan.modes.items()), sorted(placements.items()), plan.hidden_slices))
        self.set_modes(dict(plan.modes), check=False)
        for n, p in placements.items():
            self.set_placement(n, p, check=False)
        self.set_speeds([max(0, hi - lo) for lo, hi in plan.hidden_slices], check=False)
        self.plan = plan

    def replan(self, stats=None, *, profiles=None, global_batch: int | None = None, model_shape=None):
        """Plan modes and placements with the placement planner from routing ``stats`` (summed over ranks) and
        apply them (``"mode": "auto"``, or ``placement.replicas > 0`` in expert-parallel mode). Rank 0 plans and
        broadcasts, so every rank applies the same plan. A collective; returns the plan (None: nothing to do)."""
        cfg = self.cfg
        if stats is None or not getattr(stats, "layers", None):
            return None
        if cfg.mode not in ("auto", "expert_parallel"):
            return None
        if cfg.mode == "expert_parallel" and cfg.placement.replicas == 0:
            return None
        from ..placement import plan as make_plan
        from ..placement.model import ModelShape

        plan = None
        if self.rank == 0:
            if profiles is None:
                profiles = _profiles_for(cfg, self.world_size)
            if global_batch is None:
                global_batch = int(self.engine.train_batch_size()) if self.engine is not None else self.world_size
            if model_shape is None:
                tokens = max(stats.tokens.values()) if stats.tokens else 0
                seq = max(1, round(tokens / max(1, stats.forwards) / max(1, global_batch))) if tokens else 1
                model_shape = ModelShape.from_hf_config(getattr(self.model, "config", {}), seq_len=seq)
                model_shape.param_bytes = model_shape.grad_bytes = next(iter(self.layers[0].shards.values())).element_size()
            mode = "auto" if cfg.mode == "auto" else "expert_parallel"
            plan = make_plan(profiles, stats, global_batch=global_batch, model_shape=model_shape,
                             solver=cfg.placement.solver, replicas=cfg.placement.replicas or None,
                             time_limit=cfg.placement.ilp_time_limit, mode=mode,
                             use_affinity=cfg.placement.use_affinity)
        box = [plan]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        self.apply_plan(box[0], check=False)
        return box[0]

    def accounting_summary(self, last_step: bool = True) -> dict:
        """Token accounting and bytes per collective of the expert-parallel / model-centric layers, with the
        FSSDP weight traffic beside them (``last_step``: the last completed optimizer step, else the current)."""
        from ..parallel.accounting import TokenAccounting

        calls = self._last_step_calls if last_step else list(self.accounting.calls)
        acc = TokenAccounting(history=max(1, len(calls)))
        acc.calls.extend(calls)
        s = acc.summary()
        comm = self.last_step_stats if last_step else self.stats
        weight = comm.total_bytes
        per_layer: dict[str, dict] = {}
        for c in calls:
            name = self.layers[c.layer].name if c.layer is not None and c.layer < len(self.layers) else str(c.layer)
            d = per_layer.setdefault(name, {"mode": c.mode, "calls": 0, "tokens": 0, "rows_computed": 0, "bytes_sent": 0})
            d["calls"] += 1
            d["tokens"] += c.tokens
            d["rows_computed"] += c.rows_computed
            d["bytes_sent"] += c.bytes_sent()
        out = {
            "modes": self.modes(),
            "replicated_experts": {layer.name: sum(len(r) - 1 for r in self._placements[layer.index].values())
                                   for layer in self.layers if layer.index in self._placements},
            "calls": s["calls"], "tokens": s["tokens"], "dropped_tokens": s["dropped_tokens"],
            "token_bytes": s["bytes_sent"], "bytes_by_collective": s["bytes_by_collective"],
            "weight_bytes": weight,
            "weight_bytes_by_kind": {k: v for k, v in comm.as_dict().items() if k.endswith("bytes")},
            "total_bytes": s["bytes_sent"] + weight,
            "per_layer": per_layer,
        }
        for k in ("lsh_compression_mean", "lsh_rel_error_mean"):
            if k in s:
                out[k] = s[k]
        return out

    def _pack(self, t: torch.Tensor):
        rec = self._forward_record
        if rec is not None and rec.slot is not None and isinstance(t, torch.Tensor) and not t.is_sparse \
                and t.untyped_storage().data_ptr() == rec.slot.buf.untyped_storage().data_ptr():
            return _Handle(rec, t)
        return t

    def _unpack(self, packed):
        if not isinstance(packed, _Handle):
            return packed
        buf = self._ensure_backward(packed.record)
        t = torch.empty(0, dtype=buf.dtype, device=buf.device)
        return t.set_(buf.untyped_storage(), packed.offset, packed.size, packed.stride)

    def _ensure_backward(self, record: CallRecord) -> torch.Tensor:
        """The record's weights, re-gathered into a cache slot unless they are still (or already) there."""
        slot = record.slot
        if slot is not None and slot.owner is record:
            slot.claim(record)  # finishes a prefetch in flight
        else:
            slot = self.cache.slot(self._bwd_turn, record.layer.dtype, record.layer.device)
            slot.claim(record)
            sparse_all_gather(record.layer, record.transfer, record.layer.full_views(slot.buf), self.group,
                              self.stats, kind="regather_bytes").wait()
        self._bwd_turn = self._slot_index(slot) + 1
        if self.prefetch:
            nxt = self._previous_record(record)
            if nxt is not None:
                other = self.cache.slot(self._bwd_turn, nxt.layer.dtype, nxt.layer.device)
                if other is not slot:
                    other.claim(nxt)
                    other.pending = sparse_all_gather(nxt.layer, nxt.transfer, nxt.layer.full_views(other.buf),
                                                      self.group, self.stats, kind="regather_bytes", async_op=True)
        return slot.buf

    def _slot_index(self, slot) -> int:
        for slots in self.cache._slots.values():
            if slot in slots:
                return slots.index(slot)
        return 0

    def _previous_record(self, record: CallRecord) -> CallRecord | None:
        """The layer call backward reaches next: the latest earlier record still waiting for its weights."""
        best = None
        for ref in self._records:
            r = ref()
            if r is None or r.done or r.seq >= record.seq or (r.slot is not None and r.slot.owner is r):
                continue
            if best is None or r.seq > best.seq:
                best = r
        return best

    # ------------------------------------------------------------------------------- gradients
    def _reduce_grads(self, layer: ExpertLayer, transfer: Transfer, grads: dict) -> None:
        pending = sparse_reduce_scatter(layer, transfer, grads, self.group, self.stats, async_op=self.prefetch)
        acc = functools.partial(self._accumulate, layer, pending)
        if self.prefetch:
            self._pending.append(Pending(None, acc))
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        else:
            acc()

    def _accumulate(self, layer: ExpertLayer, pending: Pending) -> None:
        summed = pending.wait()
        if summed is None:
            return
        scale = 1.0 / self.world_size  # DeepSpeed averages dense gradients over data-parallel ranks
        for n, g in summed.items():
            self.grads[(layer.index, n)].add_(g, alpha=scale)

    def _finish_backward(self) -> None:
        self._callback_queued = False
        self.synchronize()

    def synchronize(self) -> None:
        """Finish every asynchronous reduce-scatter still in flight (FIFO: the order they were issued)."""
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait()

    # ----------------------------------------------------------------------------- statistics
    def comm_stats(self) -> dict:
        """Bytes this rank sent since the last optimizer step (``last_step_comm_stats()``: the step before).

        With expert-parallel / model-centric layers, ``token_bytes`` (their token all-to-alls, all-gathers and
        reduce-scatters, forward and backward) is added and counted in ``total``; with LSH on,
        ``lsh_compression`` (rows sent / pairs bound to other ranks, mean over calls) too.
        """
        return self._with_tokens(self.stats.as_dict(), list(self.accounting.calls))

    def last_step_comm_stats(self) -> dict:
        return self._with_tokens(self.last_step_stats.as_dict(), self._last_step_calls)

    @staticmethod
    def _with_tokens(d: dict, calls: list) -> dict:
        if calls:
            tok = sum(c.bytes_sent() for c in calls)
            d["token_bytes"] = tok
            d["total"] += tok
            comp = [c.lsh_compression for c in calls if c.lsh_compression is not None]
            if comp:
                d["lsh_compression"] = sum(comp) / len(comp)
            err = [c.lsh_rel_error for c in calls if c.lsh_rel_error is not None]
            if err:
                d["lsh_rel_error"] = sum(err) / len(err)
        return d

    def _end_step(self) -> None:
        self.last_step_stats, self.stats = self.stats, CommStats()
        self._last_step_calls = list(self.accounting.calls)
        self.accounting.calls.clear()

    def memory_stats(self) -> dict[str, int]:
        """Bytes of expert state this rank holds: shards, fp32 grads/masters/optimizer state, and the cache."""
        params = sum(p.numel() * p.element_size() for p in self.shard_parameters())
        out = {"shard_param_bytes": params, "cache_bytes": self.cache.nbytes()}
        if self.optimizer is not None:
            out.update(self.optimizer.nbytes())
        else:
            out["grad_bytes"] = sum(g.numel() * g.element_size() for g in self.grads.values())
        out["expert_state_bytes"] = sum(v for k, v in out.items() if k != "cache_bytes")
        return out

    # ------------------------------------------------------------------------------ optimizer
    def expert_grad_sq_norm(self) -> torch.Tensor:
        """Global squared norm of the expert gradients (disjoint shards: a sum over ranks); a collective."""
        self.synchronize()
        local = torch.zeros((), dtype=torch.float64)
        for g in self.grads.values():
            if g.numel():
                local += g.double().pow(2).sum()
        dist.all_reduce(local, group=self.group)
        self.stats.norm_bytes += 8 * (self.world_size - 1)
        return local

    def expert_grads_overflow(self) -> bool:
        self.synchronize()
        bad = torch.tensor([0], dtype=torch.uint8)
        for g in self.grads.values():
            if g.numel() and not torch.isfinite(g).all():
                bad.fill_(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        self.stats.norm_bytes += self.world_size - 1
        return bool(bad.item())

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.zero_()

    def build_optimizer(self, spec) -> ShardedOptimizer:
        shards = {(layer.index, n): p for layer in self.layers for n, p in layer.shards.items()}
        self.optimizer = ShardedOptimizer.create(shards, self.grads, spec)
        return self.optimizer

    def attach(self, engine, optimizer_config: dict | None = None, lr_scheduler=None) -> None:
        """Drive the shards from ``engine``: step, global clipping, LR schedule, zero_grad, checkpoints."""
        from .engine import attach

        attach(self, engine, optimizer_config=optimizer_config, lr_scheduler=lr_scheduler)

    # ---------------------------------------------------------------------------- checkpoints
    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict with full experts (a collective); ``{}`` on other ranks when ``rank0_only``."""
        from .checkpoint import full_state_dict

        return full_state_dict(self, rank0_only=rank0_only)


def _drop_shards(layer: ExpertLayer, module, state_dict, prefix, local_metadata) -> None:
    # a shard is meaningful only with its rank's expert range: checkpoints keep shards in FSSDP's own
    # files and full_state_dict() gives full experts; the module's state dict carries the dense part
    for n in layer.param_names:
        state_dict.pop(prefix + n, None)


def _load_full_into_shards(layer: ExpertLayer, module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                           errors) -> None:
    module._hexamoe_load_prefix = prefix
    lo, hi = layer.first, layer.first + layer.local_count
    for n in layer.param_names:
        t = state_dict.pop(prefix + n, None)
        if t is not None and t.dim() >= 1 and t.size(0) == layer.num_experts:  # a full (e.g. Hugging Face) tensor
            with torch.no_grad():
                layer.shards[n].copy_(t[lo:hi])


def _forgive_missing_shards(layer: ExpertLayer, module, incompatible) -> None:
    prefix = getattr(module, "_hexamoe_load_prefix", "")
    drop = {prefix + n for n in layer.param_names}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in drop]


def _declared_speeds(cfg: HexaMoEConfig, world: int) -> list[float] | None:
    """Model-centric slice speeds from declared device profiles (``tflops / slowdown``), else None (equal)."""
    devs = cfg.devices
    if not devs or len(devs) != world or any(d.tflops is None for d in devs):
        return None
    return [d.tflops / d.slowdown for d in devs]


def _profiles_for(cfg: HexaMoEConfig, world: int):
    """Device profiles for the planner: declared ones when given, else this host measured, for every rank."""
    from ..placement.profiles import load_profiles, measure_profile

    if cfg.devices_file is not None:
        return load_profiles(cfg.devices_file)
    if cfg.devices:
        entries = [{k: v for k, v in dataclasses.asdict(d).items() if v is not None} for d in cfg.devices]
        return load_profiles({"devices": entries})
    return [measure_profile("cpu" if not torch.cuda.is_available() else "cuda", tokens=256, hidden=128, ffn=256)] * world

"""Megatron-core experts backend: HexaMoE's expert-specific operators inside megatron-core's ``MoELayer``.

``HexaMoEMegatronExperts`` has the constructor and forward of megatron-core 0.16's grouped experts
(``GroupedMLP`` / ``TEGroupedMLP`` / ``SequentialMLP``): built by ``build_module(spec, num_local_experts,
config, pg_collection=...)`` and called as ``forward(permuted_local_hidden_states, tokens_per_expert,
permuted_probs) -> (output, None)``. Its parameters use transformers v5's expert layout
(``gate_up_proj [E, 2f, d]`` / ``up_proj [E, f, d]``, ``down_proj [E, d, f]``, optional biases) and it
carries the same attributes as a transformers experts module (``has_gate``, ``is_transposed``, ...), so
FSSDP and the kernels handle it exactly like Hugging Face experts (docs/design.md, "Experts protocol and
routing statistics").

Plug it in with :func:`hexamoe_moe_spec` (a full ``MoELayer`` spec) or :func:`use_hexamoe_experts`
(rewrites the experts of any existing layer spec, e.g. ``get_gpt_layer_local_spec(num_experts=...)``).
:func:`convert_hf_mixtral_experts` / :func:`convert_megatron_experts_to_hf` move Mixtral expert and router
weights between Hugging Face checkpoints and this layout (or megatron's ``SequentialMLP`` layout).

Requires ``pip install ds-hexamoe[megatron]`` (megatron-core >= 0.12; written against 0.16).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from ds_hexamoe.ops import expert_mlp
from ds_hexamoe.ops.activations import activation_name
from ds_hexamoe.ops.routing import ExpertIndex
from ds_hexamoe.experts import state_of

try:
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec

    HAVE_MEGATRON = True
except ImportError:  # the converters below work without megatron-core
    MegatronModule = torch.nn.Module  # type: ignore[misc,assignment]
    ModuleSpec = None  # type: ignore[assignment]
    HAVE_MEGATRON = False

_INSTALL_HINT = "megatron-core is not installed; run `pip install ds-hexamoe[megatron]` (megatron-core>=0.12)"


def _require_megatron() -> None:
    if not HAVE_MEGATRON:
        raise ImportError(_INSTALL_HINT)


def _group_size(group) -> int:
    return 1 if group is None else group.size()


def _group_rank(group) -> int:
    return 0 if group is None else group.rank()


def _check_config(config) -> str:
    """Reject megatron settings this backend does not implement, before any parameter is allocated."""
    act = activation_name(config.activation_func)
    if act is None:
        raise ValueError(
            f"TransformerConfig.activation_func: {getattr(config.activation_func, '__name__', config.activation_func)!r} "
            "has no closed-form derivative in ds_hexamoe; use torch.nn.functional.silu or torch.nn.functional.gelu"
        )
    if getattr(config, "activation_func_clamp_value", None) is not None:
        raise ValueError("TransformerConfig.activation_func_clamp_value: the HexaMoE experts support no clamped GLU; set it to None")
    if getattr(config, "glu_linear_offset", 0.0) not in (0, 0.0):
        raise ValueError("TransformerConfig.glu_linear_offset: the HexaMoE experts need 0.0")
    if getattr(config, "moe_latent_size", None):
        raise ValueError("TransformerConfig.moe_latent_size: latent MoE projections are not supported by the HexaMoE experts; set None")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        raise ValueError("TransformerConfig.fp8/fp4: the HexaMoE experts run in the parameter dtype; disable fp8/fp4")
    if config.moe_ffn_hidden_size is None:
        raise ValueError("TransformerConfig.moe_ffn_hidden_size: required (the expert intermediate size)")
    return act


class HexaMoEMegatronExperts(MegatronModule):
    """Megatron-core experts module computing every expert with ESMM/ESTMM/ESS (dropless, no padding)."""

    # transformers-v5 experts attributes: FSSDP and ``expert_weights`` treat this like HF experts
    is_transposed = False
    is_concatenated = True
    has_post_expert_norm = False

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
        _require_megatron()
        act = _check_config(config)
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        if _group_size(self.tp_group) > 1:
            raise ValueError(
                "expert_tensor_parallel_size: the HexaMoE experts keep whole experts per rank (shard with FSSDP "
                "or expert parallelism instead); set expert_tensor_parallel_size=1"
            )
        self.num_local_experts = self.num_experts = num_local_experts
        self.act_name = act
        self.act_fn = config.activation_func
        self.has_gate = bool(config.gated_linear_unit)
        self.has_bias = bool(config.add_bias_linear)
        self.expert_parallel = config.expert_model_parallel_size > 1
        d, f = config.hidden_size, config.moe_ffn_hidden_size
        use_cuda = not config.use_cpu_initialization and torch.cuda.is_available()
        kw = dict(dtype=config.params_dtype, device=torch.cuda.current_device() if use_cuda else "cpu")
        up = "gate_up_proj" if self.has_gate else "up_proj"
        self._up_name = up
        f1 = 2 * f if self.has_gate else f
        self.register_parameter(up, torch.nn.Parameter(torch.empty(num_local_experts, f1, d, **kw)))
        self.down_proj = torch.nn.Parameter(torch.empty(num_local_experts, d, f, **kw))
        if self.has_bias:
            self.register_parameter(f"{up}_bias", torch.nn.Parameter(torch.zeros(num_local_experts, f1, **kw)))
            self.down_proj_bias = torch.nn.Parameter(torch.zeros(num_local_experts, d, **kw))
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(getattr(self, up))
                config.output_layer_init_method(self.down_proj)
        for p in self.parameters():
            # megatron's DDP reads this: expert-parallel params are reduced over the expert-DP group only
            setattr(p, "allreduce", not self.expert_parallel)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Experts on expert-ordered rows: ``(output [P, d], None)``, weighted by ``permuted_probs``."""
        x = permuted_local_hidden_states
        probs = permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input: only works with moe_router_topk=1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = None
        if x.size(0) == 0:
            # keep every expert parameter in the graph so DDP sees (zero) gradients
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return x.new_zeros(0, self.config.hidden_size) + zero.to(x.dtype), None
        counts = torch.as_tensor(tokens_per_expert, device=x.device).to(torch.int64)
        offs = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(counts, 0, out=offs[1:])
        state_of(self).last_counts = counts  # HexaMoERuntime.metrics() reads the expert load from here
        # rows already arrive sorted by expert: the re-index vector is the identity
        index = ExpertIndex(idx=torch.arange(x.size(0), device=x.device), offs=offs, counts=counts, k=1)
        w1 = getattr(self, self._up_name)
        b1 = getattr(self, f"{self._up_name}_bias") if self.has_bias else None
        b2 = self.down_proj_bias if self.has_bias else None
        out = expert_mlp(
            x, w1.transpose(1, 2), self.down_proj.transpose(1, 2), index, act=self.act_name, gated=self.has_gate,
            b1=b1, b2=b2, row_scale=None if probs is None else probs.reshape(-1),
        )
        return out.to(x.dtype), None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the fused backward; nothing is deferred."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed-checkpoint tensors: local experts are the ``ep_rank``-th chunk of the global expert axis."""
        from megatron.core.dist_checkpointing import ShardedTensor

        ep_size, ep_rank = _group_size(self.ep_group), _group_rank(self.ep_group)
        n = len(sharded_offsets)
        out = {}
        for name, p in self.named_parameters(recurse=False):
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", p, *sharded_offsets, (n, ep_rank, ep_size),
                replica_id=(0, 0, _group_rank(self.dp_group)), prepend_axis_num=n,
            )
        return out


def hexamoe_experts_spec():
    """The experts ``ModuleSpec`` for ``MoESubmodules.experts``."""
    _require_megatron()
    return ModuleSpec(module=HexaMoEMegatronExperts)


def use_hexamoe_experts(spec):
    """Replace the experts of every ``MoESubmodules`` inside ``spec`` (in place) with HexaMoE's; returns ``spec``.

    Works on an ``MoELayer`` spec, a transformer-layer spec or a block spec (its ``layer_specs``).
    """
    _require_megatron()
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    found = []

    def walk(obj, seen):
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, MoESubmodules):
            obj.experts = hexamoe_experts_spec()
            found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, seen)
        elif isinstance(obj, ModuleSpec):
            walk(obj.submodules, seen)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for fld in dataclasses.fields(obj):
                walk(getattr(obj, fld.name), seen)

    walk(spec, set())
    if not found:
        raise ValueError("spec: no MoESubmodules found; pass an MoE layer spec, e.g. get_gpt_layer_local_spec(num_experts=8)")
    return spec


def hexamoe_moe_spec(num_experts: int, use_te: bool = False):
    """A megatron ``MoELayer`` spec (router, dispatcher, shared experts as usual) with HexaMoE experts."""
    _require_megatron()
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return use_hexamoe_experts(get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=False))


# ----------------------------------------------------------------------------------------------------
# checkpoint conversion: Hugging Face Mixtral <-> megatron (HexaMoE experts or SequentialMLP)

_HF_V5 = re.compile(r"^(?P<pre>.*?)layers\.(?P<l>\d+)\.mlp\.(?:experts\.(?P<w>gate_up_proj|down_proj)|gate\.weight)$")
_HF_LEGACY = re.compile(
    r"^(?P<pre>.*?)layers\.(?P<l>\d+)\.block_sparse_moe\.(?:experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight|gate\.weight)$"
)
_MG_HEXA = re.compile(r"^(?P<pre>.*?)layers\.(?P<l>\d+)\.mlp\.(?:experts\.(?P<w>gate_up_proj|down_proj)|router\.weight)$")
_MG_SEQ = re.compile(
    r"^(?P<pre>.*?)layers\.(?P<l>\d+)\.mlp\.(?:experts\.local_experts\.(?P<e>\d+)\.(?P<w>linear_fc[12])\.weight|router\.weight)$"
)
TARGETS = ("hexamoe", "sequential")


def _collect_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[int, dict]:
    """Per layer: ``{"gate_up": [E, 2f, d], "down": [E, d, f], "router": [E, d] | None}`` from either HF layout."""
    layers: dict[int, dict] = {}
    legacy: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in state_dict.items():
        m = _HF_V5.match(key)
        if m:
            ent = layers.setdefault(int(m["l"]), {})
            ent[{"gate_up_proj": "gate_up", "down_proj": "down", None: "router"}[m["w"]]] = t
            continue
        m = _HF_LEGACY.match(key)
        if m:
            l = int(m["l"])
            if m["w"] is None:
                layers.setdefault(l, {})["router"] = t
            else:
                legacy.setdefault(l, {}).setdefault(int(m["e"]), {})[m["w"]] = t
    for l, experts in legacy.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise ValueError(f"state_dict: layer {l} lacks block_sparse_moe.experts.{missing[0]}.* (experts must be 0..E-1)")
        for e in ids:
            for w in ("w1", "w2", "w3"):
                if w not in experts[e]:
                    raise ValueError(f"state_dict: layers.{l}.block_sparse_moe.experts.{e}.{w}.weight is missing")
        ent = layers.setdefault(l, {})
        ent["gate_up"] = torch.stack([torch.cat([experts[e]["w1"], experts[e]["w3"]], 0) for e in ids])
        ent["down"] = torch.stack([experts[e]["w2"] for e in ids])
    for l, ent in layers.items():
        if "gate_up" not in ent or "down" not in ent:
            raise ValueError(f"state_dict: layer {l} has a router but no expert weights (gate_up_proj/down_proj or w1/w2/w3)")
        ent.setdefault("router", None)
        e, f2, d = ent["gate_up"].shape
        if ent["down"].shape != (e, d, f2 // 2):
            raise ValueError(
                f"state_dict: layer {l} down_proj has shape {tuple(ent['down'].shape)}; expected {(e, d, f2 // 2)} "
                f"to match gate_up_proj {tuple(ent['gate_up'].shape)}"
            )
    if not layers:
        raise ValueError(
            "state_dict: no Mixtral expert weights found; expected keys like "
            "'model.layers.0.mlp.experts.gate_up_proj' (transformers v5) or "
            "'model.layers.0.block_sparse_moe.experts.0.w1.weight' (Hugging Face checkpoints)"
        )
    return layers


def convert_hf_mixtral_experts(
    state_dict: Mapping[str, torch.Tensor],
    *,
    target: str = "hexamoe",
    prefix: str = "decoder.layers.",
    include_router: bool = True,
    ep_size: int = 1,
    ep_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """Mixtral expert (and router) weights from a Hugging Face state dict, in megatron-core's key layout.

    Accepts transformers v5 keys (``...layers.L.mlp.experts.gate_up_proj``) and Hugging Face checkpoint
    keys (``...layers.L.block_sparse_moe.experts.E.w1.weight``; ``w1`` gate, ``w3`` up, ``w2`` down). Only
    expert and router keys are returned (attention, norms and embeddings are left to the caller).

    ``target="hexamoe"``: ``{prefix}L.mlp.experts.gate_up_proj [E, 2f, d]`` and ``down_proj [E, d, f]``;
    ``target="sequential"``: megatron's ``SequentialMLP`` keys ``{prefix}L.mlp.experts.local_experts.e.
    linear_fc1.weight [2f, d]`` / ``linear_fc2.weight [d, f]``. The router becomes ``{prefix}L.mlp.router.weight``.
    With ``ep_size > 1`` only rank ``ep_rank``'s contiguous slice of experts is kept (numbered locally).
    """
    if target not in TARGETS:
        raise ValueError(f"target: got {target!r}; expected one of {TARGETS}")
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank/ep_size: got {ep_rank}/{ep_size}; expected ep_size >= 1 and 0 <= ep_rank < ep_size")
    out: dict[str, torch.Tensor] = {}
    for l, ent in sorted(_collect_hf(state_dict).items()):
        num = ent["gate_up"].size(0)
        if num % ep_size:
            raise ValueError(f"ep_size: {ep_size} does not divide the {num} experts of layer {l}")
        lo, hi = ep_rank * num // ep_size, (ep_rank + 1) * num // ep_size
        gate_up, down = ent["gate_up"][lo:hi], ent["down"][lo:hi]
        base = f"{prefix}{l}.mlp."
        if target == "hexamoe":
            out[base + "experts.gate_up_proj"] = gate_up.clone()
            out[base + "experts.down_proj"] = down.clone()
        else:
            for e in range(hi - lo):
                out[f"{base}experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e].clone()
                out[f"{base}experts.local_experts.{e}.linear_fc2.weight"] = down[e].clone()
        if include_router and ent["router"] is not None:
            out[base + "router.weight"] = ent["router"].clone()
    return out


def convert_megatron_experts_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    *,
    layout: str = "v5",
    prefix: str = "model.layers.",
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_hf_mixtral_experts` (full expert sets, either megatron layout).

    ``layout="v5"``: ``{prefix}L.mlp.experts.gate_up_proj`` / ``down_proj`` / ``mlp.gate.weight``;
    ``layout="legacy"``: ``{prefix}L.block_sparse_moe.experts.E.w1/w2/w3.weight`` / ``block_sparse_moe.gate.weight``.
    """
    if layout not in ("v5", "legacy"):
        raise ValueError(f"layout: got {layout!r}; expected 'v5' or 'legacy'")
    layers: dict[int, dict] = {}
    seq: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in state_dict.items():
        m = _MG_HEXA.match(key)
        if m:
            layers.setdefault(int(m["l"]), {})[{"gate_up_proj": "gate_up", "down_proj": "down", None: "router"}[m["w"]]] = t
            continue
        m = _MG_SEQ.match(key)
        if m and m["w"] is not None:
            seq.setdefault(int(m["l"]), {}).setdefault(int(m["e"]), {})[m["w"]] = t
    for l, experts in seq.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[e]) != 2 for e in ids):
            raise ValueError(f"state_dict: layer {l} local_experts are incomplete (need linear_fc1 and linear_fc2 for 0..E-1)")
        layers.setdefault(l, {})["gate_up"] = torch.stack([experts[e]["linear_fc1"] for e in ids])
        layers[l]["down"] = torch.stack([experts[e]["linear_fc2"] for e in ids])
    if not layers or any("gate_up" not in v or "down" not in v for v in layers.values()):
        raise ValueError(
            "state_dict: no complete megatron expert weights found; expected 'decoder.layers.L.mlp.experts.gate_up_proj' "
            "and 'down_proj' (HexaMoE experts) or 'decoder.layers.L.mlp.experts.local_experts.E.linear_fc1.weight' (SequentialMLP)"
        )
    out: dict[str, torch.Tensor] = {}
    for l, ent in sorted(layers.items()):
        gate_up, down, router = ent["gate_up"], ent["down"], ent.get("router")
        if layout == "v5":
            out[f"{prefix}{l}.mlp.experts.gate_up_proj"] = gate_up.clone()
            out[f"{prefix}{l}.mlp.experts.down_proj"] = down.clone()
            if router is not None:
                out[f"{prefix}{l}.mlp.gate.weight"] = router.clone()
        else:
            f = gate_up.size(1) // 2
            for e in range(gate_up.size(0)):
                base = f"{prefix}{l}.block_sparse_moe.experts.{e}."
                out[base + "w1.weight"] = gate_up[e, :f].clone()
                out[base + "w3.weight"] = gate_up[e, f:].clone()
                out[base + "w2.weight"] = down[e].clone()
            if router is not None:
                out[f"{prefix}{l}.block_sparse_moe.gate.weight"] = router.clone()
    return out


__all__ = [
    "HAVE_MEGATRON", "HexaMoEMegatronExperts", "hexamoe_experts_spec", "use_hexamoe_experts", "hexamoe_moe_spec",
    "convert_hf_mixtral_experts", "convert_megatron_experts_to_hf",
]

"""The model shape the cost model needs: sizes, FLOPs per token and bytes per expert.

Presets cover the shapes the benchmarks use; :meth:`ModelShape.from_hf_config` reads a transformers
MoE config (Mixtral, Qwen2/3-MoE, OLMoE, ... field names).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..config import ConfigError


@dataclass
class ModelShape:
    """Sizes of an MoE transformer; all FLOP and byte counts below are per training step (fwd + bwd)."""

    hidden: int
    expert_ffn: int  # f: hidden size of one expert
    num_experts: int
    top_k: int
    num_moe_layers: int
    num_layers: int | None = None  # transformer blocks; None: num_moe_layers (every block has MoE)
    seq_len: int = 4096
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    dense_ffn: int = 0  # MLP size of blocks without MoE, and of shared experts (0: none)
    gated: bool = True
    bias: bool = False
    param_bytes: int = 2  # bf16 weights and activations
    grad_bytes: int = 2
    optimizer_bytes: int = 12  # per parameter: fp32 master + Adam m and v
    activation_bytes_per_token: float | None = None  # None: estimated (see activation_bytes)
    # keep only block inputs and recompute in backward: less memory, one more forward of FLOPs
    activation_checkpointing: bool = False

    def __post_init__(self):
        for f in ("hidden", "expert_ffn", "num_experts", "top_k", "num_moe_layers", "seq_len", "num_heads",
                  "vocab_size", "param_bytes", "grad_bytes"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{f}: got {v!r}; expected an integer >= 1")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.top_k: got {self.top_k}; expected at most num_experts ({self.num_experts})")
        if self.num_layers is not None and self.num_layers < self.num_moe_layers:
            raise ConfigError(f"model.num_layers: got {self.num_layers}; expected >= num_moe_layers ({self.num_moe_layers})")

    @property
    def layers(self) -> int:
        return self.num_layers or self.num_moe_layers

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.num_heads

    # -- parameters ---------------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        f1 = 2 * self.expert_ffn if self.gated else self.expert_ffn
        p = self.hidden * f1 + self.expert_ffn * self.hidden
        return p + (f1 + self.hidden if self.bias else 0)

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.param_bytes

    @property
    def expert_grad_bytes(self) -> int:
        return self.expert_params * self.grad_bytes

    @property
    def attn_params(self) -> int:
        q = self.num_heads * self.hd
        kv = 2 * self.kv_heads * self.hd
        return self.hidden * (q + kv) + q * self.hidden

    @property
    def dense_params(self) -> int:
        """Everything but the routed experts: attention, routers, dense MLPs, embeddings, LM head."""
        mlp = (3 if self.gated else 2) * self.hidden * self.dense_ffn
        dense_blocks = self.layers - self.num_moe_layers
        return (self.layers * self.attn_params + self.num_moe_layers * (self.hidden * self.num_experts + mlp)
                + dense_blocks * mlp + 2 * self.vocab_size * self.hidden)

    @property
    def expert_update_bytes(self) -> int:
        """Bytes an optimizer step over every expert of the model reads and writes: gradient and weight,
        and each fp32 state tensor (master, Adam moments) read and written; memory-bound, so this over a
        device's memory bandwidth is its time (an FSSDP owner pays its shard's part)."""
        per = self.param_bytes + self.grad_bytes + 2 * self.optimizer_bytes
        return self.num_moe_layers * self.num_experts * self.expert_params * per

    # -- FLOPs (forward + backward = 3x forward; 4x with activation checkpointing) -------------------
    @property
    def passes(self) -> float:
        return 4.0 if self.activation_checkpointing else 3.0

    @property
    def pair_flops(self) -> float:
        """One (token, expert) pair through one expert, fwd + bwd."""
        return self.passes * 2.0 * self.expert_params

    @property
    def score_flops_per_token(self) -> float:
        """The attention kernel's part (QK^T and PV, causal half) over all blocks, fwd + bwd: grows with
        ``seq_len``, and runs at a device's ``sdpa_tflops``."""
        return self.passes * self.layers * 2.0 * 2.0 * self.seq_len * self.num_heads * self.hd * 0.5

    @property
    def dense_flops_per_token(self) -> float:
        """Attention (projections and causal scores), routers, dense MLPs and the LM head, fwd + bwd."""
        return self.passes * 2.0 * self.dense_params + self.score_flops_per_token

    @property
    def token_bytes(self) -> int:
        return self.hidden * self.param_bytes

    def activation_bytes(self) -> float:
        """Activation memory per token kept for backward: Korthikanti et al.'s ``34 h`` bytes per block
        (16-bit, flash attention) plus the experts' ``k (2 f1 + f)`` values per MoE block; with
        checkpointing, the block inputs plus one block being recomputed."""
        if self.activation_bytes_per_token is not None:
            return float(self.activation_bytes_per_token)
        f1 = 2 * self.expert_ffn if self.gated else self.expert_ffn
        moe = self.top_k * (f1 + f1 + self.expert_ffn) * self.param_bytes
        block = 34.0 * self.hidden * self.param_bytes / 2 + moe
        if self.activation_checkpointing:  # block inputs, plus one block's full activations while recomputing
            return self.layers * self.hidden * self.param_bytes + block
        return self.layers * block

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> ModelShape:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: got {d!r}; expected an object of model shape fields or a preset name")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown key; allowed keys are {sorted(known)}")
        required = ("hidden", "expert_ffn", "num_experts", "top_k", "num_moe_layers")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: missing; a model shape needs {list(required)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: Any, seq_len: int | None = None) -> ModelShape:
        """From a transformers MoE config object or dict."""
        g = (lambda k, default=None: cfg.get(k, default)) if isinstance(cfg, dict) else \
            (lambda k, default=None: getattr(cfg, k, default))
        hidden = g("hidden_size")
        ffn = g("moe_intermediate_size") or g("intermediate_size")
        experts = g("num_local_experts") or g("num_experts")
        top_k = g("num_experts_per_tok") or g("top_k")
        layers = g("num_hidden_layers")
        if None in (hidden, ffn, experts, top_k, layers):
            raise ConfigError("model config: needs hidden_size, (moe_)intermediate_size, num_local_experts/num_experts, "
                              "num_experts_per_tok and num_hidden_layers (an MoE transformers config)")
        step = g("decoder_sparse_step", 1) or 1
        moe_layers = len([i for i in range(layers) if (i + 1) % step == 0 and i not in (g("mlp_only_layers") or [])])
        return cls(hidden=hidden, expert_ffn=ffn, num_experts=experts, top_k=top_k, num_moe_layers=max(1, moe_layers),
                   num_layers=layers, seq_len=seq_len or min(4096, g("max_position_embeddings", 4096) or 4096),
                   num_heads=g("num_attention_heads", 32), num_kv_heads=g("num_key_value_heads"),
                   head_dim=g("head_dim"), vocab_size=g("vocab_size", 32000),
                   dense_ffn=(g("shared_expert_intermediate_size", 0) or 0))


MODEL_SHAPES: dict[str, ModelShape] = {
    "mixtral-8x7b": ModelShape(hidden=4096, expert_ffn=14336, num_experts=8, top_k=2, num_moe_layers=32,
                               seq_len=4096, num_heads=32, num_kv_heads=8, vocab_size=32000, activation_checkpointing=True),
    "qwen3-30b-a3b": ModelShape(hidden=2048, expert_ffn=768, num_experts=128, top_k=8, num_moe_layers=48,
                                seq_len=4096, num_heads=32, num_kv_heads=4, head_dim=128, vocab_size=151936, activation_checkpointing=True),
    "olmoe-1b-7b": ModelShape(hidden=2048, expert_ffn=1024, num_experts=64, top_k=8, num_moe_layers=16,
                              seq_len=4096, num_heads=16, vocab_size=50304, activation_checkpointing=True),
    # the tiny Mixtral-like shape the CPU tests and examples train
    "tiny": ModelShape(hidden=64, expert_ffn=128, num_experts=8, top_k=2, num_moe_layers=4, seq_len=128,
                       num_heads=4, vocab_size=512, param_bytes=4, grad_bytes=4),
}


def resolve_model(model: str | dict | ModelShape | None, stats_model: dict | None = None) -> ModelShape:
    """A preset name, a dict of fields, a ModelShape, or (None) the shape recorded in the statistics."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        if model not in MODEL_SHAPES:
            raise ConfigError(f"model: got {model!r}; expected a preset ({', '.join(MODEL_SHAPES)}) or a shape object")
        return MODEL_SHAPES[model]
    if isinstance(model, dict):
        return ModelShape.from_dict(model)
    if stats_model is not None:
        return ModelShape.from_dict(stats_model, "stats.model")
    raise ConfigError("model: missing; pass a preset name (" + ", ".join(MODEL_SHAPES) + "), a shape object, "
                      "or statistics whose 'model' field records it (profile-routing writes one)")

"""A Hugging Face MoE causal LM cut into the segments the zebra pipeline runs (docs/modes.md, "Zebra").

Decoder layer ``l`` of a Mixtral-family model (``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp`` = router ``gate`` + experts ``experts``) becomes an *attention
segment* (embedding first when ``l = 0``; the residual, attention, norm and router) and an *expert
segment* (the experts' MLP from the module's own 3-D weights, on the rows a rank hosts). The final norm,
``lm_head`` and the shifted cross-entropy are the head. Same interface as
:class:`ds_hexamoe.testing.zebra.ZebraModel`, so :class:`~.zebra.ZebraPipeline` and the tests'
:class:`~ds_hexamoe.testing.zebra.ColocatedStep` run it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..experts.protocol import closed_form, expert_weights, flag, is_experts_module
from .local_experts import compute_experts, expert_region
from .weights import ExpertSpec, ExpertWeights

IGNORE = -100  # transformers' label for "no loss here"
_DECODER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


@dataclass(frozen=True)
class StackShape:
    """What the pipeline reads of a stack: ``layers`` MoE blocks of width ``d``, ``experts`` experts, top-``top_k``."""

    layers: int
    d: int
    experts: int
    top_k: int


class HFZebraStack(torch.nn.Module):
    """``model`` (a transformers ``...ForCausalLM`` whose every decoder layer is an MoE block) as zebra segments.

    Raises ``ValueError`` naming the part the pipeline cannot cut (a shared expert, a dense layer, a custom
    gate, the router's auxiliary loss, router jitter), before any work."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        cfg, base = model.config, getattr(model, "model", None)
        name = type(model).__name__
        for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if base is None or not hasattr(base, part):
                raise ValueError(f"zebra: {name} has no model.{part}; the pipeline cuts Mixtral-family decoders only")
        if not hasattr(model, "lm_head"):
            raise ValueError(f"zebra: {name} has no lm_head; expected a ...ForCausalLM model")
        if getattr(cfg, "output_router_logits", False):
            raise ValueError("zebra: config.output_router_logits is true; the pipeline does not compute the router's "
                             "auxiliary loss: set it to false")
        self.blocks = list(base.layers)
        for i, block in enumerate(self.blocks):
            self._check_block(i, block)
        first = self.blocks[0].mlp.experts
        w = expert_weights(first)  # [E, d, F1], [E, f, d]
        act, _ = closed_form(first)
        self.spec = ExpertSpec(num_experts=int(w["w1"].size(0)), ffn_dim=int(w["w2"].size(1)), act=act,
                               gated=flag(first, "has_gate"), interleaved=not flag(first, "is_concatenated"))
        self.c = StackShape(layers=len(self.blocks), d=int(w["w1"].size(1)), experts=self.spec.num_experts,
                            top_k=int(getattr(self.blocks[0].mlp, "top_k", cfg.num_experts_per_tok)))
        self._sliding = getattr(cfg, "sliding_window", None) is not None

    def _check_block(self, i: int, block) -> None:
        where = f"zebra: decoder layer {i}"
        extra = {n for n, _ in block.named_children()} - _DECODER_PARTS
        if extra or not _DECODER_PARTS <= {n for n, _ in block.named_children()}:
            raise ValueError(f"{where} ({type(block).__name__}) has parts {sorted(extra) or 'missing'} beside "
                             f"{sorted(_DECODER_PARTS)}; the pipeline cuts plain pre-norm MoE blocks only")
        mlp = block.mlp
        parts = {n for n, _ in mlp.named_children()}
        if parts != {"gate", "experts"} or not is_experts_module(mlp.experts):
            raise ValueError(f"{where}: its mlp ({type(mlp).__name__}) has {sorted(parts)}; expected exactly a router "
                             "'gate' and an experts module 'experts' (no shared expert, no dense MLP layers)")
        if getattr(mlp, "jitter_noise", 0) or getattr(mlp.gate, "jitter_noise", 0):
            raise ValueError(f"{where}: router jitter noise is on; set config.router_jitter_noise = 0 for zebra")
        _, why = closed_form(mlp.experts)
        if why is not None or flag(mlp.experts, "has_bias"):
            raise ValueError(f"{where}: its experts cannot run outside their module ({why or 'expert biases'}); "
                             "use a colocated mode for this model")

    # -- the segment interface of ZebraModel -------------------------------------------------------------------
    def dense_parameters(self):
        """Everything but the experts' 3-D weights: held and stepped by the attention ranks."""
        experts = {id(p) for p in self.expert_parameters()}
        return [p for p in self.model.parameters() if id(p) not in experts]

    def expert_parameters(self):
        return [p for b in self.blocks for p in b.mlp.experts.parameters()]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def attention_segment(self, layer: int, z: torch.Tensor):
        """``z [B, S, d]`` -> ``h [B, S, d]`` (after attention), router inputs ``x [B*S, d]``, ``top_k_index``,
        ``top_k_weights``: the decoder layer up to its experts, as transformers computes it."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        b, s, d = z.shape
        base, block = self.model.model, self.blocks[layer]
        pos = torch.arange(s, device=z.device).unsqueeze(0)
        mask_fn = create_sliding_window_causal_mask if self._sliding else create_causal_mask
        mask = mask_fn(config=self.model.config, inputs_embeds=z, attention_mask=None, past_key_values=None,
                       position_ids=pos)
        a, _ = block.self_attn(hidden_states=block.input_layernorm(z), position_embeddings=base.rotary_emb(z, pos),
                               attention_mask=mask, position_ids=pos)
        h = z + a
        x = block.post_attention_layernorm(h).reshape(b * s, d)
        _, top_w, top_i = block.mlp.gate(x)
        return h, x, top_i, top_w.to(x.dtype)

    def experts_of(self, layer: int, hosted: list[int]) -> ExpertWeights:
        """Differentiable ``[n, d, F1]`` / ``[n, f, d]`` weights of the ``hosted`` experts of ``layer``."""
        w = expert_weights(self.blocks[layer].mlp.experts)
        ids = torch.as_tensor(hosted, dtype=torch.int64, device=w["w1"].device)
        return ExpertWeights(w["w1"].index_select(0, ids), w["w2"].index_select(0, ids))

    def expert_segment(self, layer: int, hosted: list[int], x, local_idx, w, weights: ExpertWeights | None = None):
        with expert_region():
            weights = self.experts_of(layer, hosted) if weights is None else weights
            return compute_experts(x, local_idx, w, weights, self.spec)

    @staticmethod
    def _shifted(labels: torch.Tensor) -> torch.Tensor:
        return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]

    def loss_count(self, labels: torch.Tensor) -> int:
        """Tokens of ``labels`` that carry a loss (next-token targets that are not ``-100``)."""
        return int((self._shifted(labels) != IGNORE).sum())

    def head_loss(self, z: torch.Tensor, labels: torch.Tensor, denom: int) -> torch.Tensor:
        """Summed next-token cross-entropy over ``denom`` (the global count of loss tokens): this share of the
        batch's mean, so the shares add up to transformers' loss."""
        logits = self.model.lm_head(self.model.model.norm(z)).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), self._shifted(labels).reshape(-1),
                               ignore_index=IGNORE, reduction="sum") / denom

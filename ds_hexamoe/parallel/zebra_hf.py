"""A Hugging Face MoE causal LM cut into the segments the zebra pipeline runs (docs/modes.md, "Zebra").

Families: every decoder whose MoE layer is pre-norm attention + router ``gate`` + experts ``experts``,
optionally with a shared expert beside them (Qwen2-MoE's gated ``shared_expert``, DeepSeek-V3's
``shared_experts``), and with dense decoder layers anywhere (DeepSeek-V3's first layers, Qwen's
``mlp_only_layers``): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3. Zebra layer ``i`` is the
``i``-th MoE decoder layer: its *attention segment* runs the dense decoder layers before it (the embedding
first when ``i = 0``), then its residual, attention, norm, router and shared expert (added to the
residual); its *expert segment* is the routed experts' MLP from the module's own 3-D weights, on the rows
a rank hosts. Dense layers after the last MoE layer, the final norm, ``lm_head`` and the shifted
cross-entropy are the head. Same interface as :class:`ds_hexamoe.testing.zebra.ZebraModel`, so
:class:`~.zebra.ZebraPipeline` and the tests' :class:`~ds_hexamoe.testing.zebra.ColocatedStep` run it
unchanged. The router's auxiliary loss is :mod:`.zebra_balance`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..experts.protocol import closed_form, expert_weights, flag, is_experts_module
from .local_experts import compute_experts, expert_region
from .weights import ExpertSpec, ExpertWeights
from .zebra_balance import ZebraBalance

IGNORE = -100  # transformers' label for "no loss here"
_DECODER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
# the MoE blocks whose forward is router + experts (+ this shared expert added): exact when cut here
_MOE_PARTS = ({"gate", "experts"}, {"gate", "experts", "shared_expert", "shared_expert_gate"},
              {"gate", "experts", "shared_experts"})


@dataclass(frozen=True)
class StackShape:
    """What the pipeline reads of a stack: ``layers`` MoE blocks of width ``d``, ``experts`` experts, top-``top_k``."""

    layers: int
    d: int
    experts: int
    top_k: int


def _is_moe(mlp) -> bool:
    return any(is_experts_module(m) for m in mlp.modules())


def shared_expert(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """The shared expert's output on ``x [T, d]`` as the MoE block adds it (None: the block has none)."""
    if hasattr(mlp, "shared_experts"):
        return mlp.shared_experts(x)
    if not hasattr(mlp, "shared_expert"):
        return None
    return torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)


class HFZebraStack(torch.nn.Module):
    """``model`` (a transformers ``...ForCausalLM`` of the families above) as zebra segments.

    Raises ``ValueError`` naming the part the pipeline cannot cut (an MoE block of another shape, a custom
    gate, expert biases, router jitter), before any work."""

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
        self.blocks = list(base.layers)
        for i, block in enumerate(self.blocks):
            self._check_block(i, block)
        self.moe_layers = [i for i, b in enumerate(self.blocks) if _is_moe(b.mlp)]
        if not self.moe_layers:
            raise ValueError(f"zebra: {name} has no MoE decoder layer; nothing to disaggregate (train it colocated)")
        first = self.blocks[self.moe_layers[0]].mlp.experts
        w = expert_weights(first)  # [E, d, F1], [E, f, d]
        act, _ = closed_form(first)
        self.spec = ExpertSpec(num_experts=int(w["w1"].size(0)), ffn_dim=int(w["w2"].size(1)), act=act,
                               gated=flag(first, "has_gate"), interleaved=not flag(first, "is_concatenated"))
        top_k = getattr(self.blocks[self.moe_layers[0]].mlp.gate, "top_k", None) or cfg.num_experts_per_tok
        self.c = StackShape(layers=len(self.moe_layers), d=int(w["w1"].size(1)), experts=self.spec.num_experts,
                            top_k=int(top_k))
        self.balance = ZebraBalance.of(model, self.c)  # None: no auxiliary loss
        # per MoE layer, expert -> row of the compact experts weights (zebra_parts.keep_part); None: uncut
        self.rows: list[dict[int, int]] | None = None
        self.loss_scale = 1.0  # fp16: the head's losses are scaled, so every gradient is

    def _check_block(self, i: int, block) -> None:
        where = f"zebra: decoder layer {i}"
        extra = {n for n, _ in block.named_children()} - _DECODER_PARTS
        if extra or not _DECODER_PARTS <= {n for n, _ in block.named_children()}:
            raise ValueError(f"{where} ({type(block).__name__}) has parts {sorted(extra) or 'missing'} beside "
                             f"{sorted(_DECODER_PARTS)}; the pipeline cuts plain pre-norm decoder layers only")
        mlp = block.mlp
        if not _is_moe(mlp):
            return  # a dense layer: runs whole on the attention ranks
        parts = {n for n, _ in mlp.named_children()}
        if parts not in _MOE_PARTS or not is_experts_module(mlp.experts):
            raise ValueError(f"{where}: its mlp ({type(mlp).__name__}) has {sorted(parts)}; expected a router 'gate' "
                             "and an experts module 'experts', with at most a shared expert ('shared_expert' + "
                             "'shared_expert_gate', or 'shared_experts'): use a colocated mode for this model")
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
        return [p for layer in range(self.c.layers) for p in self.layer_expert_parameters(layer)]

    def layer_expert_parameters(self, layer: int):
        """The experts' 3-D weights of MoE layer ``layer``."""
        return list(self.blocks[self.moe_layers[layer]].mlp.experts.parameters())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def _mask(self, i: int, z: torch.Tensor, pos: torch.Tensor):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cfg = self.model.config
        kinds = getattr(cfg, "layer_types", None)
        sliding = (kinds[i] == "sliding_attention" if kinds else getattr(cfg, "sliding_window", None) is not None)
        mask_fn = create_sliding_window_causal_mask if sliding else create_causal_mask
        return mask_fn(config=cfg, inputs_embeds=z, attention_mask=None, past_key_values=None, position_ids=pos)

    def _attend(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``i`` up to its MLP: ``z`` plus its attention, as transformers computes it."""
        block = self.blocks[i]
        pos = torch.arange(z.size(1), device=z.device).unsqueeze(0)
        a, _ = block.self_attn(hidden_states=block.input_layernorm(z), attention_mask=self._mask(i, z, pos),
                               position_embeddings=self.model.model.rotary_emb(z, pos), position_ids=pos)
        return z + a

    def _dense(self, lo: int, hi: int, z: torch.Tensor) -> torch.Tensor:
        """Whole dense decoder layers ``lo..hi-1``."""
        for i in range(lo, hi):
            h = self._attend(i, z)
            z = h + self.blocks[i].mlp(self.blocks[i].post_attention_layernorm(h))
        return z

    def attention_segment(self, layer: int, z: torch.Tensor):
        """``z [B, S, d]`` -> ``h [B, S, d]`` (after attention, plus the shared expert), router inputs
        ``x [B*S, d]``, ``top_k_index``, ``top_k_weights``: MoE layer ``layer`` up to its routed experts."""
        i = self.moe_layers[layer]
        z = self._dense(self.moe_layers[layer - 1] + 1 if layer else 0, i, z)
        b, s, d = z.shape
        mlp = self.blocks[i].mlp
        h = self._attend(i, z)
        x = self.blocks[i].post_attention_layernorm(h).reshape(b * s, d)
        logits, top_w, top_i = mlp.gate(x)
        shared = shared_expert(mlp, x)
        if shared is not None:
            h = h + shared.view(b, s, d)
        if self.balance is not None:
            h = self.balance.record(h, logits)
        return h, x, top_i, top_w.to(x.dtype)

    def experts_of(self, layer: int, hosted: list[int]) -> ExpertWeights:
        """Differentiable ``[n, d, F1]`` / ``[n, f, d]`` weights of the ``hosted`` experts of ``layer``."""
        w = expert_weights(self.blocks[self.moe_layers[layer]].mlp.experts)
        rows = hosted if self.rows is None else [self.rows[layer][e] for e in hosted]
        ids = torch.as_tensor(rows, dtype=torch.int64, device=w["w1"].device)
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
        batch's mean, so the shares add up to transformers' loss. Dense layers after the last MoE layer first."""
        if self.balance is not None:
            self.balance.settle()  # every attention segment of the step has run: the global expert fractions
        z = self._dense(self.moe_layers[-1] + 1, len(self.blocks), z)
        logits = self.model.lm_head(self.model.model.norm(z)).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), self._shifted(labels).reshape(-1),
                               ignore_index=IGNORE, reduction="sum") / denom
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

"""Top-k router: softmax or sigmoid scoring, load-balancing and z losses, aux-loss-free expert bias."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import RouterConfig
from ..distributed import dist_on
from .balance import balance_loss


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [T, E] fp32
    top_k_weights: torch.Tensor  # [T, k] fp32
    top_k_index: torch.Tensor  # [T, k] int64
    aux_loss: torch.Tensor  # scalar, already scaled by aux_loss_coef
    z_loss: torch.Tensor  # scalar, already scaled by z_loss_coef
    counts: torch.Tensor  # [E] tokens per expert (over all k choices)


class TopKRouter(nn.Module):
    """``logits = x W^T``; picks ``k`` experts per token.

    * ``score_func="softmax"``: Mixtral/Qwen style, weights are softmax probabilities of the chosen experts.
    * ``score_func="sigmoid"``: DeepSeek-V3 style, independent sigmoid scores.
    * ``norm_topk_prob``: renormalize the chosen weights to sum to one.
    * ``aux_loss_coef > 0`` (null: 0.01): the Switch/Mixtral balancing loss in training, its expert fractions over all ranks
      (:mod:`.balance`, one all-reduce per forward): weighted by their rows, the ranks' losses are one process's.
    * ``bias_update_rate > 0``: aux-loss-free balancing; a per-expert bias shifts *selection* only (never
      the weights) and moves by ``rate * sign(mean_load - load)`` after each training forward.
    """

    def __init__(self, hidden_size: int, num_experts: int, config: RouterConfig | None = None):
        super().__init__()
        self.config = config or RouterConfig()
        if self.config.top_k > num_experts:
            raise ValueError(f"router.top_k={self.config.top_k} exceeds num_experts={num_experts}; choose top_k <= num_experts")
        self.num_experts = num_experts
        self.top_k = self.config.top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        nn.init.normal_(self.weight, std=0.02)
        self.weight.requires_grad_(not self.config.freeze)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        if self.training and cfg.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
        logits_TE = nn.functional.linear(x_TD, self.weight)
        if logits_TE.dtype in (torch.float16, torch.bfloat16):
            logits_TE = logits_TE.float()  # routing decisions in fp32, as Mixtral/Qwen do
        if cfg.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE + self.expert_bias if cfg.bias_update_rate > 0 else scores_TE
        _, top_k_index = torch.topk(select_TE, self.top_k, dim=-1)
        top_k_weights = scores_TE.gather(1, top_k_index)
        if cfg.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        counts_E = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)

        zero = logits_TE.new_zeros(())
        aux = zero
        if cfg.aux_coef > 0 and self.training:
            # Switch/Mixtral balance loss: E * sum_e (fraction of assignments to e) * (mean router prob of e),
            # the fractions over the global batch (.balance: the loss then does not depend on the split)
            probs_TE = scores_TE if cfg.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            aux = cfg.aux_coef * balance_loss(counts_E, top_k_index.numel(), probs_TE.sum(0), probs_TE.size(0))
        z = zero
        if cfg.z_loss_coef > 0 and self.training:
            z = cfg.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        if cfg.bias_update_rate > 0 and self.training:
            self._update_bias(counts_E)
        return RouterOutput(logits_TE, top_k_weights, top_k_index, aux, z, counts_E)

    @torch.no_grad()
    def _update_bias(self, counts_E: torch.Tensor) -> None:
        load = counts_E.float()
        if dist_on():
            # every rank must keep the same bias, so balance on the global load
            dist.all_reduce(load)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)

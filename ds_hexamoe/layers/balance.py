"""The load-balancing (Switch/Mixtral) auxiliary loss of a global batch split over ranks.

One process computes ``aux = E * sum_e f_e P_e`` over the whole batch: ``f_e`` the fraction of routing
assignments to expert ``e`` (top-k picks, no gradient), ``P_e`` the mean router probability of ``e``. Split
over ranks, rank ``r`` computes ::

    aux_r = E * sum_e f_e * P_e(r)        f reduced over all ranks (detached), P(r) the mean over its own rows

Then ``sum_r n_r / N * aux_r = aux`` in value and in gradient (``n_r`` the rank's rows, ``N`` all rows):
the row-weighted mean over ranks the colocated step takes of every rank's loss (``hetero.loss_scale``), so
uneven batch shares and any rank count give one process's loss. A per-rank ``f`` made the loss depend on
how the batch was split.
"""
from __future__ import annotations

import torch

from ..distributed import host_all_reduce


def balance_loss(counts_E: torch.Tensor, assignments, prob_sum_E: torch.Tensor, rows,
                 share: float | None = None) -> torch.Tensor:
    """This rank's ``E * sum_e f_e * prob_sum_E[e] / rows``: ``f`` from every rank's ``counts_E`` over every
    rank's ``assignments`` (one all-reduce, no gradient), the probabilities (with their gradient) summed over
    this rank's ``rows``. ``share``: the weight the caller gives this rank's loss (its units over all ranks');
    given, ``rows`` is all ranks' rows times ``share``, so the weighted sum over ranks is the global loss
    whatever units the weights count. Outside a process group: the one-process loss of this batch."""
    n = counts_E.numel()
    local = torch.zeros(n + 2, dtype=torch.float32, device=counts_E.device)
    local[:n] = counts_E.detach().reshape(-1)
    local[n], local[n + 1] = assignments, rows
    total = host_all_reduce(local.clone())  # in place
    f_E = total[:n] / total[n].clamp_min(1.0)
    per_rows = local[n + 1].clamp_min(1.0) if share is None else (total[n + 1] * share).clamp_min(1e-30)
    return n * (f_E * prob_sum_E / per_rows.to(prob_sum_E.device)).to(prob_sum_E.dtype).sum()


def pooled_router_sums(gate_logits: tuple[torch.Tensor, ...], top_k: int,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts_E, prob_sum_E, rows)`` of transformers' ``load_balancing_loss_func`` (layers pooled, padding
    left out by ``attention_mask``): its loss is ``E * sum(counts / rows * prob_sum / rows)``."""
    device = gate_logits[0].device
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    counts = torch.zeros(gate_logits[0].size(-1), dtype=torch.float32, device=device)
    probs = torch.zeros_like(counts)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in gate_logits:
        p = torch.softmax(logits.to(device), dim=-1)
        _, picked = torch.topk(p, top_k, dim=-1)
        w = torch.ones(p.size(0), dtype=torch.float32, device=device) if mask is None else mask
        counts = counts + torch.zeros_like(counts).scatter_add_(0, picked.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (p.float() * w.unsqueeze(-1)).sum(0)
        rows = rows + w.sum()
    return counts, probs, rows

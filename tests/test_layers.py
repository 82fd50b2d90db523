"""Router and MoE block against naive per-token references (outputs and gradients)."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.config import RouterConfig
from ds_hexamoe.layers import MoEBlock, TopKRouter, moe_aux_loss


def _naive_route(x, w, cfg: RouterConfig, bias=None):
    logits = (x @ w.t()).double()
    scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    idx, wts = [], []
    for t in range(x.size(0)):
        sel = scores[t] + (bias if bias is not None else 0)
        order = sorted(range(w.size(0)), key=lambda e: -float(sel[e].detach()))[: cfg.top_k]
        ws = torch.stack([scores[t, e] for e in order])
        if cfg.norm_topk_prob:
            ws = ws / ws.sum()
        idx.append(order)
        wts.append(ws)
    return torch.tensor(idx), torch.stack(wts), scores, logits


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_naive(score_func, norm):
    torch.manual_seed(0)
    cfg = RouterConfig(top_k=3, score_func=score_func, norm_topk_prob=norm, aux_loss_coef=0.5, z_loss_coef=0.1)
    r = TopKRouter(16, 6, cfg).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    out = r(x)
    idx, wts, scores, logits = _naive_route(x, r.weight, cfg)
    assert torch.equal(out.top_k_index, idx)
    torch.testing.assert_close(out.top_k_weights.double(), wts, rtol=1e-6, atol=1e-7)
    counts = torch.bincount(idx.flatten(), minlength=6).double()
    assert torch.equal(out.counts, counts.long())
    probs = scores if score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    aux = 0.5 * 6 * ((counts / idx.numel()) * probs.mean(0)).sum()
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-5, atol=1e-7)
    z = 0.1 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(out.z_loss.double(), z, rtol=1e-5, atol=1e-7)


def test_router_losses_off_in_eval_and_gradients_reach_router():
    torch.manual_seed(1)
    r = TopKRouter(8, 4, RouterConfig(top_k=2, aux_loss_coef=1.0, z_loss_coef=1.0))
    x = torch.randn(10, 8)
    out = r(x)
    (out.aux_loss + out.z_loss + out.top_k_weights.sum()).backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    r.eval()
    out = r(x)
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0


def test_aux_loss_free_bias_moves_toward_balance():
    torch.manual_seed(2)
    r = TopKRouter(8, 4, RouterConfig(top_k=1, aux_loss_coef=0.0, bias_update_rate=0.02, norm_topk_prob=False))
    x = torch.randn(256, 8) + 0.5
    with torch.no_grad():
        r.weight.normal_(std=0.3)
        r.weight[0] = 0.25  # a skewed router: expert 0 is most tokens' favourite
    first = r(x).counts.clone()
    assert first[0] > 128
    # overloaded expert pushed down, under-loaded ones pulled up
    assert r.expert_bias[0] == -0.02 and (r.expert_bias[1:][first[1:] < 64] == 0.02).all()
    late = [r(x).counts.max().item() for _ in range(60)][-20:]
    assert max(late) < first.max().item() * 0.75
    # the bias only changes selection: weights are still the router's own probabilities
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), -1)
    torch.testing.assert_close(out.top_k_weights, probs.gather(1, out.top_k_index))


def _naive_block(block: MoEBlock, x):
    r = block.router
    logits = x @ r.weight.t()
    probs = torch.softmax(logits.double(), -1)
    top_w, top_i = torch.topk(probs, r.top_k, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    ex = block.experts
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        for j in range(r.top_k):
            e = int(top_i[t, j])
            if ex.has_gate:
                h = ex.gate_up_proj[e] @ x[t]
                f = h.numel() // 2
                a = torch.nn.functional.silu(h[:f]) * h[f:]
            else:
                h = ex.up_proj[e] @ x[t] + ex.up_proj_bias[e]
                a = torch.nn.functional.gelu(h)
            y = ex.down_proj[e] @ a
            if ex.has_bias:
                y = y + ex.down_proj_bias[e]
            out[t] = out[t] + top_w[t, j].to(x.dtype) * y
    return out


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu")])
def test_block_matches_naive_loop(gated, bias, act):
    torch.manual_seed(3)
    block = MoEBlock(12, 10, 5, RouterConfig(top_k=2, aux_loss_coef=0.01), act=act, gated=gated, bias=bias).double()
    if bias:
        with torch.no_grad():
            for n, p in block.experts.named_parameters():
                if n.endswith("_bias"):
                    p.normal_()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    y = block(x)
    ref = _naive_block(block, x.reshape(-1, 12)).reshape(2, 7, 12)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    params = [x] + [p for p in block.parameters()]
    ga = torch.autograd.grad(y, params, g, allow_unused=True)
    gb = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(ga, gb):
        if b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert moe_aux_loss(block) is not None and moe_aux_loss(block).item() > 0


def test_block_all_tokens_to_one_expert_is_exact():
    torch.manual_seed(4)
    block = MoEBlock(8, 6, 4, RouterConfig(top_k=1, aux_loss_coef=0.0)).double()
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[2] = 5.0
    x = torch.rand(9, 8, dtype=torch.float64) + 0.5
    y = block(x)
    assert block.counts.tolist() == [0, 0, 9, 0]
    torch.testing.assert_close(y, _naive_block(block, x), rtol=1e-10, atol=1e-10)


def test_top_k_larger_than_experts_is_rejected():
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        TopKRouter(8, 4, RouterConfig(top_k=5))

"""Test and benchmark models for the zebra pipeline (docs/modes.md, "Zebra"): a small MoE stack cut where
tokens leave attention ranks (:class:`ZebraModel`), a deterministic batch, and the non-disaggregated
baseline the pipeline is compared with (:class:`ColocatedStep`). Not used by training.

A pre-norm block ``h = z + attn(ln1(z)); x = ln2(h); y = experts(x); z' = h + y`` is cut into an
*attention segment* (everything but the experts: residual, causal attention, router) and an *expert
segment* (the dropless expert MLP of the pairs a rank hosts). The last segment is the output head and
the loss. Every segment is a plain function of detached inputs, so a pipeline can run forward and
backward of each (layer, micro-batch) on its own and in any order.

:class:`ColocatedStep`: every rank runs attention on its batch share and hosts some experts, reached
through :class:`~ds_hexamoe.parallel.expert_parallel.ExpertParallelMoE` at every layer. Uneven ``shares``
and ``expert_owner`` make it the heterogeneous expert-parallel plan; even ones the uniform plan. Dense
gradients are summed over all ranks; each expert's gradient lives on its owner only. ``expert_owner=None``
is the data-centric plan instead: every rank computes every expert for its own tokens and expert
gradients are summed over ranks too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..parallel.expert_parallel import ExpertParallelMoE
from ..parallel.local_experts import compute_experts, expert_region
from ..parallel.weights import ExpertSpec, ExpertWeights


@dataclass(frozen=True)
class ZebraModelConfig:
    """Shape of the stack: ``layers`` blocks of model dim ``d``, ``experts`` gated SiLU experts of size ``ffn``."""

    layers: int = 2
    d: int = 32
    heads: int = 4
    seq: int = 16
    experts: int = 4
    ffn: int = 48
    top_k: int = 2

    def __post_init__(self):
        for name in ("layers", "d", "heads", "seq", "experts", "ffn", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"zebra.model.{name}: got {v!r}; expected an integer >= 1")
        if self.d % self.heads:
            raise ValueError(f"zebra.model.heads: {self.heads} does not divide d = {self.d}; pick a divisor of d")
        if self.top_k > self.experts:
            raise ValueError(f"zebra.model.top_k: got {self.top_k} > experts = {self.experts}; expected top_k <= experts")

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.experts, self.ffn, act="silu", gated=True)


class DenseLayer(nn.Module):
    """Attention half of one block plus its router."""

    def __init__(self, c: ZebraModelConfig):
        super().__init__()
        self.c = c
        self.ln1, self.ln2 = nn.LayerNorm(c.d), nn.LayerNorm(c.d)
        self.qkv, self.proj = nn.Linear(c.d, 3 * c.d), nn.Linear(c.d, c.d)
        self.router = nn.Linear(c.d, c.experts, bias=False)

    def forward(self, z: torch.Tensor):
        """``z [B, S, d]`` -> ``h [B, S, d]``, normalized rows ``x [B*S, d]``, ``top_k_index``, ``top_k_weights``."""
        b, s, d = z.shape
        q, k, v = self.qkv(self.ln1(z)).view(b, s, 3, self.c.heads, d // self.c.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        h = z + self.proj(a)
        x = self.ln2(h).reshape(b * s, d)
        top_w, top_i = torch.topk(self.router(x).softmax(-1), self.c.top_k, dim=-1)
        return h, x, top_i, top_w / top_w.sum(-1, keepdim=True)


class ZebraModel(nn.Module):
    """Dense part (``dense``: blocks' attention and routers, the head) and experts (``w1 [L, E, d, 2f]``,
    ``w2 [L, E, f, d]``), kept apart because disaggregation places them on different ranks."""

    def __init__(self, c: ZebraModelConfig, seed: int = 0):
        super().__init__()
        self.c = c
        g = torch.Generator().manual_seed(seed)
        self.dense = nn.ModuleDict({"blocks": nn.ModuleList(DenseLayer(c) for _ in range(c.layers)), "head": nn.Linear(c.d, c.d)})
        for p in self.dense.parameters():  # deterministic across processes, independent of torch's global RNG
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
        self.w1 = nn.Parameter(torch.randn(c.layers, c.experts, c.d, 2 * c.ffn, generator=g) / math.sqrt(c.d))
        self.w2 = nn.Parameter(torch.randn(c.layers, c.experts, c.ffn, c.d, generator=g) / math.sqrt(c.ffn))

    @property
    def spec(self) -> ExpertSpec:
        return self.c.spec

    def dense_parameters(self):
        """What the attention ranks hold and step: blocks' attention and routers, the head."""
        return list(self.dense.parameters())

    def expert_parameters(self):
        return [self.w1, self.w2]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs  # the stack takes vectors, not token ids

    def loss_count(self, target: torch.Tensor) -> int:
        """Elements of ``target`` in the loss's mean."""
        return target.numel()

    def experts_of(self, layer: int, hosted: list[int]) -> ExpertWeights:
        """Differentiable weights of the ``hosted`` experts of ``layer``."""
        ids = torch.as_tensor(hosted, dtype=torch.int64)
        return ExpertWeights(self.w1[layer].index_select(0, ids), self.w2[layer].index_select(0, ids))

    def attention_segment(self, layer: int, z: torch.Tensor):
        return self.dense["blocks"][layer](z)

    def expert_segment(self, layer: int, hosted: list[int], x, local_idx, w, weights: ExpertWeights | None = None) -> torch.Tensor:
        """Sum over a row's pairs hosted here (``local_idx < len(hosted)``) of ``w * expert(x)``; ``weights``:
        the hosted experts already materialized (default: taken from the parameters now)."""
        with expert_region():  # taking the experts out of the parameters is expert-layer work too
            weights = self.experts_of(layer, hosted) if weights is None else weights
            return compute_experts(x, local_idx, w, weights, self.c.spec)

    def head_loss(self, z: torch.Tensor, target: torch.Tensor, denom: int) -> torch.Tensor:
        """Summed squared error over ``denom``: a share of the global mean, so shares add up exactly."""
        return (self.dense["head"](z) - target).pow(2).sum() / denom


def make_batch(c: ZebraModelConfig, samples: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic regression batch ``(inputs, target)``, each ``[samples, seq, d]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, c.seq, c.d, generator=g)
    return x, torch.tanh(x.roll(1, dims=1)) + 0.1 * torch.randn(samples, c.seq, c.d, generator=g)


class ColocatedStep:
    """Forward + backward of one global batch, expert parallel without disaggregation."""

    def __init__(self, model: ZebraModel, shares: list[int], expert_owner: list[int] | None):
        self.model, self.rank, world = model, dist.get_rank(), dist.get_world_size()
        if len(shares) != world or any(not isinstance(s, int) or s < 1 for s in shares):
            raise ValueError(f"colocated.shares: got {shares}; expected one integer >= 1 per rank ({world})")
        bad_owner = expert_owner is not None and (
            len(expert_owner) != model.c.experts or any(not 0 <= r < world for r in expert_owner))
        if bad_owner:
            raise ValueError(f"colocated.expert_owner: got {expert_owner}; expected a rank in [0, {world}) per expert")
        self.shares, self.global_batch = shares, sum(shares)
        self.placement = None if expert_owner is None else {e: [r] for e, r in enumerate(expert_owner)}
        self.moe = ExpertParallelMoE(model.spec)

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        m, c = self.model, self.model.c
        denom = torch.tensor([m.loss_count(target)], dtype=torch.int64)
        dist.all_reduce(denom)  # the loss is a mean over the global batch
        z = m.embed(inputs)
        for layer in range(c.layers):
            h, x, idx, w = m.attention_segment(layer, z)
            if self.placement is None:
                y = m.expert_segment(layer, list(range(c.experts)), x, idx, w)
            else:
                y = self.moe(x, idx, w, self.placement, lambda hosted, _r, l=layer: m.experts_of(l, list(hosted)), layer)
            z = h + y.view_as(h)
        loss = m.head_loss(z, target, int(denom))
        loss.backward()
        params = m.dense_parameters() + (m.expert_parameters() if self.placement is None else [])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat, grads)
        return float(loss.detach())


def one_process(model: ZebraModel, inputs: torch.Tensor, routes: list | None = None) -> torch.Tensor:
    """The stack's last hidden state in one process, every expert here; each layer's ``top_k_index`` is
    appended to ``routes`` when given."""
    z = model.embed(inputs)
    for layer in range(model.c.layers):
        h, x, idx, w = model.attention_segment(layer, z)
        if routes is not None:
            routes.append(idx)
        z = h + model.expert_segment(layer, list(range(model.c.experts)), x, idx, w).view_as(h)
    return z


def one_process_loss(model: ZebraModel, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss whose gradients a pipeline must reproduce."""
    return model.head_loss(one_process(model, inputs), target, model.loss_count(target))


# scripts/gpu_check.py's zebra section: the stack, batch and placements it runs on 2 ranks (rank 0 attends;
# the second placement is Asym-EA's, rank 0 hosting experts 0 in layer 0 and 1, 3 in layer 1)
DEVICE_CHECK = {"config": ZebraModelConfig(layers=2, d=32, heads=4, seq=16, experts=4, ffn=48, top_k=2), "batch": 8,
                "owners": [(1, 1, 1, 1), ((0, 1, 1, 1), (1, 0, 1, 0))]}


def device_check_rank(rank: int, world: int, device_type: str = "cuda") -> list[dict]:
    """One rank of the GPU zebra check: one pipeline step per placement of ``DEVICE_CHECK`` with the model on
    ``cuda:rank`` (modulo the GPUs present), so the pipeline's groups are NCCL (``device_type="cpu"``: the same
    on CPU and gloo); loss, gradients (on the CPU), backend and hosted experts per placement."""
    from ..parallel.zebra import ZebraLayout, ZebraPipeline

    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 compared at 1e-4
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device_type)
    c, batch = DEVICE_CHECK["config"], DEVICE_CHECK["batch"]
    out = []
    for owner in DEVICE_CHECK["owners"]:
        model = ZebraModel(c).to(dev)
        layout = ZebraLayout((0,), (batch,), owner, micro_batches=2)
        pipe = ZebraPipeline(model, layout, batch)
        x, t = (v.to(dev) for v in make_batch(c, batch))
        loss = pipe.step(x, t) if rank == 0 else pipe.step()
        out.append({"loss": loss, "backend": pipe.wire.backend, "device": str(dev),
                    "grads": {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None},
                    "hosted": [layout.hosted(rank, l) for l in range(c.layers)]})
    return out


def device_check_errors(ranks: list[list[dict]], device_type: str = "cuda") -> dict:
    """Per placement of ``DEVICE_CHECK``: the largest relative error of the ranks' loss and gradients (each
    expert's on its host) against :func:`one_process_loss` on ``device_type``, the backend and devices."""
    c, batch = DEVICE_CHECK["config"], DEVICE_CHECK["batch"]
    ref = ZebraModel(c).to(device_type)
    x, t = (v.to(device_type) for v in make_batch(c, batch))
    loss = one_process_loss(ref, x, t)
    loss.backward()
    want = {n: p.grad.cpu() for n, p in ref.named_parameters()}

    def rel(a, b):
        return float((a - b).abs().max()) / (float(b.abs().max()) or 1.0)

    out = {}
    for i, owner in enumerate(DEVICE_CHECK["owners"]):
        errs = {"loss": abs(ranks[0][i]["loss"] - float(loss)) / abs(float(loss))}
        for r, res in enumerate(ranks):
            for n, g in res[i]["grads"].items():
                if n in ("w1", "w2"):  # each expert's gradient on its host only
                    errs |= {f"{n}[{l}] rank {r}": rel(g[l, h], want[n][l, h]) for l, h in enumerate(res[i]["hosted"]) if h}
                elif r == 0:
                    errs[n] = rel(g, want[n])
        out[str(owner)] = {"max_rel_err": max(errs.values()), "compared": len(errs),
                           "backend": ranks[0][i]["backend"], "devices": [res[i]["device"] for res in ranks]}
    return out

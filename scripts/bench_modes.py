"""Bytes moved and step time per MoE execution mode on CPU gloo ranks.

Modes, all on the same clustered synthetic tokens and the same expert weights:

* ``data_centric`` (baseline): experts replicated on every rank, local tokens only, expert weight
  gradients all-reduced (DDP);
* ``expert_parallel``: each expert hosted by one rank (its owner, so no weight moves), tokens travel
  by all-to-all; ``+lsh``: the dispatch compressed by cross-polytope LSH;
* ``model_centric``: tokens all-gathered, each rank computes a slice of every expert, outputs
  reduce-scattered; weight gradients are local.

A step is forward + backward (+ the gradient all-reduce for the baseline). Bytes are what one rank
sends to other ranks per step (the accounting in :mod:`ds_hexamoe.parallel.accounting`; the ring
all-reduce counts ``2 (W-1)/W`` of the gradient bytes). Ratios are against the baseline in the same run.

    python scripts/bench_modes.py --world 2 --out bench_modes.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from ds_hexamoe.config import LSHConfig
from ds_hexamoe.parallel import ExpertSpec, ParallelMoE, ReplicatedExperts
from ds_hexamoe.testing import run_distributed


def _data(args, rank: int):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.clusters, args.dim, generator=g) * 2
    w1 = torch.randn(args.experts, args.dim, 2 * args.ffn, generator=g) / args.dim**0.5
    w2 = torch.randn(args.experts, args.ffn, args.dim, generator=g) / args.ffn**0.5
    g.manual_seed(1 + rank)
    which = torch.randint(0, args.clusters, (args.tokens,), generator=g)
    x = centers[which] + args.noise * torch.randn(args.tokens, args.dim, generator=g)
    logits = torch.nn.functional.one_hot(which % args.experts, args.experts) * 2.0 + torch.randn(args.tokens, args.experts, generator=g)
    w, idx = torch.softmax(logits, -1).topk(args.topk, -1)
    return x, idx, w, w1, w2


def _bench_rank(rank: int, world: int, args) -> dict:
    x0, idx, w, w1_0, w2_0 = _data(args, rank)
    spec = ExpertSpec(args.experts, args.ffn)
    placement = {e: [e % world] for e in range(args.experts)}
    lsh = LSHConfig(enabled=True, num_hashes=args.num_hashes, num_rotations=args.num_rotations)
    modes = {
        "data_centric": ParallelMoE(spec, "data_centric"),
        "expert_parallel": ParallelMoE(spec, "expert_parallel"),
        "expert_parallel+lsh": ParallelMoE(spec, "expert_parallel", lsh=lsh),
        "model_centric": ParallelMoE(spec, "model_centric"),
    }
    results = {}
    for name, moe in modes.items():
        w1, w2 = w1_0.clone().requires_grad_(), w2_0.clone().requires_grad_()
        mat = ReplicatedExperts(spec, w1, w2)
        times, step_bytes = [], []
        for it in range(args.warmup + args.iters):
            x = x0.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            out = moe(x, idx, w, mat, placement=placement)
            out.square().mean().backward()
            stats = moe.accounting.last()
            if name == "data_centric":  # DDP: every replica's gradient is all-reduced
                flat = torch.cat((w1.grad.flatten(), w2.grad.flatten()))
                dist.all_reduce(flat)
                ring = int(2 * (world - 1) / world * flat.numel() * flat.element_size())
                stats.record("grad_allreduce", "all_reduce", "backward", ring, ring)
            dist.barrier()
            if it >= args.warmup:
                times.append(time.perf_counter() - t0)
                step_bytes.append(stats.bytes_sent())
            w1.grad = w2.grad = None
        res = {"step_s": statistics.median(times), "bytes_sent": statistics.median(step_bytes)}
        if name == "expert_parallel+lsh":
            moe.impl.measure_lsh_error = True
            moe(x0, idx, w, mat, placement=placement)
            st = moe.accounting.last()
            res.update(lsh_compression=st.lsh_compression, lsh_rel_error=st.lsh_rel_error)
        results[name] = res
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--clusters", type=int, default=16, help="token clusters (LSH compresses within a cluster)")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--num-hashes", type=int, default=2)
    p.add_argument("--num-rotations", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench_modes.json")
    args = p.parse_args(argv)

    per_rank = run_distributed(_bench_rank, args.world, args, timeout=1200)
    base = per_rank[0]["data_centric"]
    rows = {}
    for name in per_rank[0]:
        step = max(r[name]["step_s"] for r in per_rank)  # the slowest rank sets the step
        sent = sum(r[name]["bytes_sent"] for r in per_rank) / args.world
        rows[name] = {
            "step_ms": step * 1e3,
            "bytes_per_rank": sent,
            "time_vs_data_centric": step / max(r["data_centric"]["step_s"] for r in per_rank),
            "bytes_vs_data_centric": sent / (sum(r["data_centric"]["bytes_sent"] for r in per_rank) / args.world),
        }
        for key in ("lsh_compression", "lsh_rel_error"):
            if key in per_rank[0][name]:
                rows[name][key] = sum(r[name][key] for r in per_rank) / args.world
    del base

    print(f"{args.world} CPU ranks, T={args.tokens}/rank, d={args.dim}, f={args.ffn}, E={args.experts}, k={args.topk}, fp32")
    print(f"{'mode':<22}{'step ms':>10}{'x time':>9}{'MB sent/rank':>14}{'x bytes':>9}  notes")
    for name, r in rows.items():
        note = ""
        if "lsh_compression" in r:
            note = f"compression {r['lsh_compression']:.3f}, rel. output error {r['lsh_rel_error']:.4f}"
        print(f"{name:<22}{r['step_ms']:>10.2f}{r['time_vs_data_centric']:>9.2f}{r['bytes_per_rank'] / 1e6:>14.3f}"
              f"{r['bytes_vs_data_centric']:>9.3f}  {note}")
    report = {"config": vars(args), "baseline": "data_centric", "results": rows}
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

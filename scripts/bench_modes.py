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

Trained-model path (``--path train``, default ``both``): the tiny Mixtral trained through
``ds_hexamoe.initialize`` with ``"sharding": "fssdp"`` under ZeRO-2, one engine per mode
(``data_centric``, ``expert_parallel``, ``expert_parallel+lsh``, ``model_centric``, and ``auto``: the
planner's per-layer modes from the routing statistics of the warm-up steps). Per optimizer step: wall
time (slowest rank, median) and bytes one rank sends (``manager.last_step_comm_stats()["total"]``: FSSDP
weight gathers, re-gathers, gradient reduce-scatters, masks and norms, plus the token collectives). The
planner's choice is compared with the fastest mode measured.

    python scripts/bench_modes.py --world 2 --out bench_modes.json
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from bench_common import Col, Laps, Table, write_json
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
        times, step_bytes = Laps(), []
        for it in range(args.warmup + args.iters):
            x = x0.clone().requires_grad_()
            dist.barrier()
            with times.lap(keep=it >= args.warmup):
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
                step_bytes.append(stats.bytes_sent())
            w1.grad = w2.grad = None
        res = {"step_s": times.median(), "bytes_sent": statistics.median(step_bytes)}
        if name == "expert_parallel+lsh":
            moe.impl.measure_lsh_error = True
            moe(x0, idx, w, mat, placement=placement)
            st = moe.accounting.last()
            res.update(lsh_compression=st.lsh_compression, lsh_rel_error=st.lsh_rel_error)
        results[name] = res
    return results


MODES_TRAINED = ("data_centric", "expert_parallel", "expert_parallel+lsh", "model_centric", "auto")


def _tiny_mixtral(args):
    import ds_hexamoe  # noqa: F401
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.t_dim, intermediate_size=args.t_ffn,
                        num_hidden_layers=args.t_layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=max(64, args.seq), num_local_experts=args.experts,
                        num_experts_per_tok=args.topk, router_jitter_noise=0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="hexamoe").float()


def _train_rank(rank: int, world: int, args) -> dict:
    import logging
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import ds_hexamoe

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed("gloo")
    results = {}
    for name in args.modes:
        mode = name.split("+")[0]
        hex_cfg = {"sharding": "fssdp", "mode": mode}
        if name.endswith("+lsh"):
            hex_cfg["lsh"] = {"enabled": True, "num_hashes": args.num_hashes, "num_rotations": args.num_rotations,
                              "hash_dim": args.hash_dim, "residual": False}
        ds = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9, "hexamoe": hex_cfg}
        model = _tiny_mixtral(args)
        engine, _, _, _ = ds_hexamoe.initialize(model=model, config=ds)
        mgr = engine.hexamoe.fssdp
        g = torch.Generator().manual_seed(1 + rank)
        times, sent = Laps(), []
        plan_modes = None
        for it in range(args.warmup + args.iters):
            if name == "auto" and it == args.warmup:  # the planner, on the statistics of the warm-up steps
                collector = engine.hexamoe.stats
                collector.all_reduce()
                plan = engine.hexamoe.replan(collector.snapshot())  # global batch: micro * world
                plan_modes = dict(plan.modes)
            x = torch.randint(0, args.vocab, (args.micro, args.seq), generator=g)
            dist.barrier()
            with times.lap(keep=it >= args.warmup):
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
                dist.barrier()
            if it >= args.warmup:
                sent.append(mgr.last_step_comm_stats()["total"])
        c = mgr.last_step_comm_stats()
        res = {"step_s": times.median(), "bytes_sent": statistics.median(sent),
               "weight_bytes": c["total"] - c.get("token_bytes", 0), "token_bytes": c.get("token_bytes", 0)}
        if "lsh_compression" in c:
            res["lsh_compression"] = c["lsh_compression"]
        if plan_modes is not None:
            res["plan_modes"] = plan_modes
        results[name] = res
        del engine, model, mgr
    return results


def train_bench(args) -> dict:
    per_rank = run_distributed(_train_rank, args.world, args, timeout=3000, init_process_group=False)
    rows = {}
    for name in per_rank[0]:
        step = max(r[name]["step_s"] for r in per_rank)
        rows[name] = {
            "step_ms": step * 1e3,
            "bytes_per_rank": sum(r[name]["bytes_sent"] for r in per_rank) / args.world,
            "weight_bytes_per_rank": sum(r[name]["weight_bytes"] for r in per_rank) / args.world,
            "token_bytes_per_rank": sum(r[name]["token_bytes"] for r in per_rank) / args.world,
        }
        for key in ("lsh_compression", "plan_modes"):
            if key in per_rank[0][name]:
                rows[name][key] = per_rank[0][name][key]
    base = rows.get("data_centric")
    for r in rows.values():
        if base:
            r["time_vs_data_centric"] = r["step_ms"] / base["step_ms"]
    exact = {n: r for n, r in rows.items() if n != "auto" and "+lsh" not in n}
    best = min(exact, key=lambda n: exact[n]["step_ms"]) if exact else None
    tokens = args.micro * args.seq
    print(f"\ntrained tiny Mixtral, {args.world} CPU ranks, ZeRO-2 + FSSDP, {tokens} tokens/rank/step, d={args.t_dim}, "
          f"f={args.t_ffn}, E={args.experts}, k={args.topk}, {args.t_layers} layers, fp32")
    t = Table(Col("mode", "<22"), Col("step ms", ">10.1f"), Col("x time", ">9.2f"), Col("KB sent/rank", ">14.1f"),
              Col("weights KB", ">12.1f"), Col("tokens KB", ">11.1f"), Col("notes", sep="  "))
    print(t.header())
    for name, r in rows.items():
        note = ""
        if "lsh_compression" in r:
            note = f"compression {r['lsh_compression']:.3f}"
        if "plan_modes" in r:
            note = "planner: " + ", ".join(f"{k.split('.')[2]}={v}" for k, v in r["plan_modes"].items())
        print(t.row(name, r["step_ms"], r.get("time_vs_data_centric", 1.0), r["bytes_per_rank"] / 1e3,
                    r["weight_bytes_per_rank"] / 1e3, r["token_bytes_per_rank"] / 1e3, note))
    out = {"results": rows, "best_exact_mode": best}
    if best is not None and "auto" in rows:
        out["planner_vs_best"] = rows["auto"]["step_ms"] / rows[best]["step_ms"]
        print(f"fastest exact mode measured: {best}; the planner's choice (auto) takes {out['planner_vs_best']:.2f}x its time")
    return out


def _parse(argv):
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
    p.add_argument("--path", choices=("layer", "train", "both"), default="both",
                   help="layer: one MoE layer with replicated weights; train: the tiny Mixtral trained with FSSDP")
    p.add_argument("--modes", nargs="+", default=list(MODES_TRAINED), help="trained path: modes to run")
    p.add_argument("--micro", type=int, default=8, help="trained path: sequences per rank per step")
    p.add_argument("--seq", type=int, default=32, help="trained path: tokens per sequence")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--t-dim", type=int, default=128, help="trained path: hidden size")
    p.add_argument("--t-ffn", type=int, default=256, help="trained path: expert hidden size")
    p.add_argument("--t-layers", type=int, default=2)
    p.add_argument("--hash-dim", type=int, default=4, help="trained path: LSH hash_dim (coarser: more compression)")
    return p.parse_args(argv)


def layer_bench(args) -> dict:
    """One MoE layer with replicated weights on ``args.world`` ranks: per mode the step (slowest rank) and
    the bytes one rank sends, against the data-centric baseline (printed as a table)."""
    per_rank = run_distributed(_bench_rank, args.world, args, timeout=1200)
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
    print(f"{args.world} CPU ranks, T={args.tokens}/rank, d={args.dim}, f={args.ffn}, E={args.experts}, k={args.topk}, fp32")
    t = Table(Col("mode", "<22"), Col("step ms", ">10.2f"), Col("x time", ">9.2f"), Col("MB sent/rank", ">14.3f"),
              Col("x bytes", ">9.3f"), Col("notes", sep="  "))
    print(t.header())
    for name, r in rows.items():
        note = ""
        if "lsh_compression" in r:
            note = f"compression {r['lsh_compression']:.3f}, rel. output error {r['lsh_rel_error']:.4f}"
        print(t.row(name, r["step_ms"], r["time_vs_data_centric"], r["bytes_per_rank"] / 1e6,
                    r["bytes_vs_data_centric"], note))
    return rows


def main(argv=None) -> dict:
    args = _parse(argv)
    report = {"config": vars(args)}
    if args.path in ("train", "both"):
        report["trained"] = train_bench(args)
    if args.path != "train":
        report.update({"baseline": "data_centric", "results": layer_bench(args)})
    write_json(args.out, report, indent=2)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

"""MoE layer forward+backward on CPU: hexamoe against transformers and DeepSpeed, as ratios.

    python scripts/bench_layer.py [--quick] [--json bench_layer.json] [--repeats 5] [--threads N]
                                  [--compile] [--profile] [--live-bytes]

Methods, all with the same weights and (except DeepSpeed's capacity drops) the same routing:
  hexamoe        transformers MixtralSparseMoeBlock, experts_implementation="hexamoe"
  eager          same block, transformers' per-expert loop
  grouped_mm     same block, transformers' torch._grouped_mm path over a permuted copy
  ds_moe_cf1.0   deepspeed.moe.layer.MoE, capacity factor 1.0 (drops overflow tokens)
  ds_moe_cf1.25  same, capacity factor 1.25
  dense_limit    a dense gated MLP on T*k rows: the same expert FLOPs with no routing at all

``--compile`` adds ``hexamoe_compiled`` and ``grouped_mm_compiled``: the same blocks under
``torch.compile(fullgraph=True)`` (Inductor), timed beside the eager ones (time only).
``--profile`` prints a ``torch.profiler`` table (self CPU time per op) of one hexamoe and one grouped_mm step.

Time: median of ``--repeats`` forward+backward passes, methods interleaved, all in this process.
Memory: each method again in a fresh subprocess; the RSS high-water mark is reset just before one
forward+backward (``/proc/self/clear_refs``) and the peak is ``VmHWM`` after it minus ``VmRSS`` before it,
i.e. the activation/workspace peak of the step (``resource.getrusage`` maxrss delta off Linux). Every
ratio is against the hexamoe run; the JSON also holds every method's ratios to ``grouped_mm`` and
``dense_limit`` (``time_vs``/``mem_vs``) and the output of ``uptime`` taken at the start. ``--live-bytes`` adds,
from the same child, ``live_peak_bytes``: the peak of tensor bytes allocated and not yet freed over a second
forward+backward, counted by ``torch.profiler`` (``profile_memory``) allocation by allocation, which unlike RSS
does not depend on what the C allocator keeps mapped. ``transformers``' ``batched_mm`` is left out: it allocates
tens of GiB at these sizes on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys

import torch

from bench_common import Col, Laps, Table, uptime, write_json
from ds_hexamoe.testing import live_peak_bytes

SHAPES = {  # name -> (d, f, E, k, tokens)
    "mixtral-like": (1024, 2048, 8, 2, 2048),
    "fine-grained": (512, 256, 64, 8, 2048),
}
QUICK_SHAPES = {"mixtral-like": (64, 96, 8, 2, 128), "fine-grained": (64, 32, 16, 4, 128)}
METHODS = ("hexamoe", "eager", "grouped_mm", "ds_moe_cf1.0", "ds_moe_cf1.25", "dense_limit")
COMPILED = ("hexamoe_compiled", "grouped_mm_compiled")


# ---------------------------------------------------------------- layers
def _mixtral_block(d, f, E, k, impl, seed=0):
    import ds_hexamoe  # noqa: F401  (registers "hexamoe")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k,
                        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.02)
        block.experts.gate_up_proj.normal_(0, d**-0.5)
        block.experts.down_proj.normal_(0, f**-0.5)
    return block.train()


class GatedMLP(torch.nn.Module):
    """One Mixtral expert as an ``nn.Module``, the unit DeepSpeed's MoE replicates."""

    def __init__(self, d, f):
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(g) * u)


def _init_ds_dist():
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from ds_hexamoe.testing import free_port

            os.environ["MASTER_PORT"] = str(free_port())
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _ds_moe(d, f, E, k, cf, ref_block):
    """DeepSpeed MoE holding ``ref_block``'s router and expert weights."""
    from deepspeed.moe.layer import MoE

    _init_ds_dist()
    moe = MoE(hidden_size=d, expert=GatedMLP(d, f), num_experts=E, ep_size=1, k=k, capacity_factor=cf,
              eval_capacity_factor=cf, min_capacity=4, drop_tokens=True, use_rts=False,
              top2_2nd_expert_sampling=False)  # plain top-2: the same choice as the softmax top-k router
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ref_block.gate.weight)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_up.weight.copy_(ref_block.experts.gate_up_proj[e])
            expert.down.weight.copy_(ref_block.experts.down_proj[e])
    return moe.train()


def build(method, shape):
    """``(step_fn, info)``: ``step_fn()`` runs one forward+backward of ``method``."""
    d, f, E, k, T = shape
    x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(1, T, d, generator=torch.Generator().manual_seed(2))
    info = {}
    if method in ("hexamoe", "eager", "grouped_mm") + COMPILED:
        block = _mixtral_block(d, f, E, k, method.removesuffix("_compiled"))
        if method in COMPILED:
            block = torch.compile(block, fullgraph=True)

        def step():
            xi = x.detach().requires_grad_()
            out = block(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(dy)
            block.zero_grad(set_to_none=True)
            return out
    elif method.startswith("ds_moe"):
        cf = float(method.split("cf")[1])
        moe = _ds_moe(d, f, E, k, cf, _mixtral_block(d, f, E, k, "eager"))
        capacity = max(4, math.ceil(T / E * cf * k))

        def step():
            xi = x.detach().requires_grad_()
            out, _, counts = moe(xi)
            out.backward(dy)
            moe.zero_grad(set_to_none=True)
            info["dropped_pairs"] = int((counts - capacity).clamp(min=0).sum())
            info["dropped_frac"] = info["dropped_pairs"] / (T * k)
            return out
    elif method == "dense_limit":
        w1 = (torch.randn(d, 2 * f) * d**-0.5).requires_grad_()
        w2 = (torch.randn(f, d) * f**-0.5).requires_grad_()
        xr = torch.randn(T * k, d)
        dyr = torch.randn(T * k, d)

        def step():
            xi = xr.detach().requires_grad_()
            g, u = (xi @ w1).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(g) * u) @ w2
            out.backward(dyr)
            w1.grad = w2.grad = None
            return out
    else:
        raise ValueError(method)
    return step, info


def check_same_output(shape):
    """hexamoe, eager and grouped_mm compute the same layer (guards the timing against a broken path)."""
    d, f, E, k, T = shape
    x = torch.randn(1, min(T, 256), d, generator=torch.Generator().manual_seed(3))
    outs = {}
    for m in ("hexamoe", "eager", "grouped_mm"):
        out = _mixtral_block(d, f, E, k, m)(x)
        outs[m] = (out[0] if isinstance(out, tuple) else out).detach()
    for m in ("eager", "grouped_mm"):
        err = float((outs[m] - outs["hexamoe"]).abs().max() / outs[m].abs().max())
        if err > 1e-4:
            raise AssertionError(f"{m} and hexamoe differ by {err:.2e} on {shape}")


# ---------------------------------------------------------------- measurement
def time_methods(shape, methods, repeats, warmup=1):
    from tqdm import tqdm

    steps, infos = {}, {}
    for m in methods:
        steps[m], infos[m] = build(m, shape)
        for _ in range(warmup):
            steps[m]()
    times = {m: Laps() for m in methods}
    for _ in tqdm(range(repeats), desc=f"timing {shape}", file=sys.stderr, leave=False):
        for m in methods:  # interleaved so a noisy neighbour hits every method alike
            with times[m].lap():
                steps[m]()
    return {m: v.median() for m, v in times.items()}, infos


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_child(method, shape, live=False):
    """Run in a subprocess: peak RSS growth over one forward+backward (weights and inputs already built).

    Imports leave a high-water mark above a layer step, so on Linux the mark is reset first
    (``/proc/self/clear_refs``) and the step's peak is ``VmHWM`` after it minus ``VmRSS`` before it;
    elsewhere it falls back to the ``ru_maxrss`` delta (a lower bound).
    """
    step, _ = build(method, shape)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        rss_before = _status_kib("VmRSS")
    except OSError:
        rss_before = None
    before = _maxrss_bytes()
    step()
    if rss_before is not None and _status_kib("VmHWM") is not None:
        rss = (_status_kib("VmHWM") - rss_before) * 1024
    else:
        rss = _maxrss_bytes() - before
    return (rss, live_peak_bytes(step)) if live else rss


def memory_methods(shape, methods, threads, live=False):
    """``({method: peak RSS growth}, {method: live tensor peak})``, the second empty unless ``live``."""
    out, live_out = {}, {}
    for m in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", m, "--_shape", json.dumps(shape),
               "--threads", str(threads)] + (["--live-bytes"] if live else [])
        env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # ours is held by this process's group
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory run of {m} failed:\n{res.stderr[-2000:]}")
        values = [int(v) for v in res.stdout.strip().splitlines()[-1].split()]
        out[m] = values[0]
        if live:
            live_out[m] = values[1]
    return out, live_out


def _ratios(values: dict) -> dict:
    """``{baseline: {method: value / baseline's}}`` for the baselines grouped_mm and dense_limit."""
    return {b: {m: v / values[b] for m, v in values.items()} for b in ("grouped_mm", "dense_limit")
            if values.get(b)}


def profile_tables(shape, methods=("hexamoe", "grouped_mm"), rows=12) -> dict:
    """Where one forward+backward spends its time: ``torch.profiler`` self-CPU table per method (printed too)."""
    tables = {}
    for m in methods:
        step, _ = build(m, shape)
        step()
        with torch.profiler.profile() as prof:
            step()
        tables[m] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44)
        print(f"\n{m} {shape}:\n{tables[m]}")
    return tables


# ---------------------------------------------------------------- report
REPORT = Table(Col("method", "<20"), Col("time ms", ">10.1f"), Col("time x", ">9.2f"), Col("peak MiB", ">11.1f"),
               Col("mem x", ">8.2f"), Col("t/gmm", ">8.2f"), Col("m/gmm", ">8.2f"), Col("dropped pairs", sep="  "))


def report(results):
    lines = []
    for name, r in results["shapes"].items():
        d, f, E, k, T = r["shape"]
        lines.append(f"\n{name}: d={d} f={f} E={E} k={k} tokens={T}  (x: vs hexamoe, /gmm: vs grouped_mm; < 1 is better)")
        lines.append(REPORT.header())
        tg, mg = r["time_vs"].get("grouped_mm", {}), r["mem_vs"].get("grouped_mm", {})
        t0, m0 = r["time_s"]["hexamoe"], r["peak_bytes"].get("hexamoe")
        for m in r["time_s"]:
            t, mem = r["time_s"][m], r["peak_bytes"].get(m)
            drop = r["info"].get(m, {}).get("dropped_frac")
            has_mem = mem is not None and m0
            lines.append(REPORT.row(
                m, t * 1e3, t / t0, mem / 2**20 if has_mem else None, mem / m0 if has_mem else None,
                tg.get(m, float("nan")), mg.get(m, float("nan")),
                f"{drop:.1%}" if drop is not None else "0 (dropless)" if m != "dense_limit" else "-"))
        for m, v in r.get("live_vs", {}).get("grouped_mm", {}).items():
            lines.append(f"  live tensor peak {m:<16}{r['live_peak_bytes'][m] / 2**20:>9.1f} MiB  {v:.2f}x grouped_mm")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (for tests)")
    ap.add_argument("--json", "--out", dest="out", default="bench_layer.json", help="where the JSON goes")
    ap.add_argument("--compile", action="store_true", help="also time hexamoe and grouped_mm under torch.compile")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of hexamoe and grouped_mm")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--live-bytes", action="store_true",
                    help="also count each method's peak of live tensor bytes with torch.profiler (one more step)")
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_shape", dest="shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mem_child:
        got = memory_child(args.mem_child, tuple(json.loads(args.shape)), args.live_bytes)
        print(*(got if isinstance(got, tuple) else (got,)))
        return 0
    if "hexamoe" not in args.methods:
        args.methods.insert(0, "hexamoe")
    if args.compile:
        args.methods += [m for m in COMPILED if m not in args.methods]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (2 if args.quick else 5)
    results = {"torch": torch.__version__, "threads": args.threads, "repeats": repeats, "uptime": uptime(),
               "memory_method": "subprocess per method: VmHWM after one fwd+bwd (mark reset via clear_refs) minus VmRSS before",
               "command": " ".join([os.path.basename(sys.executable), "scripts/bench_layer.py", *(argv or sys.argv[1:])]),
               "shapes": {}}
    for name, shape in shapes.items():
        check_same_output(shape)
        t, infos = time_methods(shape, args.methods, repeats)
        eager = [m for m in args.methods if m not in COMPILED]  # compiled blocks: time only
        mem, live = ({}, {}) if args.no_memory else memory_methods(shape, eager, args.threads, args.live_bytes)
        results["shapes"][name] = {
            "shape": list(shape), "time_s": t, "peak_bytes": mem, "info": infos,
            "time_ratio": {m: v / t["hexamoe"] for m, v in t.items()},
            "mem_ratio": {m: v / mem["hexamoe"] for m, v in mem.items()} if mem and mem["hexamoe"] else {},
            "time_vs": _ratios(t), "mem_vs": _ratios(mem),
        }
        if live:
            results["shapes"][name].update(live_peak_bytes=live, live_vs=_ratios(live))
        if args.profile:
            results["shapes"][name]["profile"] = profile_tables(shape)
    print(f"uptime at start: {results['uptime']}")
    print(report(results))
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

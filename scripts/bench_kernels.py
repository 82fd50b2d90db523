#!/usr/bin/env python
"""Forward + backward of one MoE expert block: ds-hexamoe's Triton kernels against grouped-GEMM baselines.

GPU mode (default): bf16, Mixtral-8x7B experts (d=4096, f=14336, E=8, k=2; 4096 and 16384 tokens) and a
fine-grained shape (d=2048, f=768, E=128, k=8), side by side in one process:

* ``hexamoe_op``          the fused ``hexamoe::expert_mlp`` custom op (ESMM/ESTMM/ESS Triton kernels)
* ``hexamoe_transformers`` transformers' experts module with ``experts_implementation="hexamoe"``
* ``grouped_mm``          transformers' ``"grouped_mm"`` experts path (``torch._grouped_mm``), the baseline
* ``deepspeed_triton``    DeepSpeed's Triton grouped GEMM (``deepspeed.ops.triton_ops.group_gemm_triton``)
* ``megablocks``          MegaBlocks' grouped GEMM (``grouped_gemm.ops.gmm``), if installed
* ``sonicmoe``            SonicMoE's MoE layer, if installed (its own router included: indicative only)
* ``dense_limit``         one cuBLAS matmul with the same FLOPs (18*P*d*f), the throughput ceiling

Times are medians of ``triton.testing.do_bench``; every figure is also given as a ratio against the dense
limit and the grouped_mm baseline measured in the same run. Writes JSON (``--out``) and a PNG beside it.
``--smoke`` runs tiny shapes on CPU through Triton's interpreter (Triton kernels vs the torch path), so a
test can run this script; it says nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

GPU_SHAPES = [  # name, d, f, E, k, tokens
    ("mixtral-8x7b/4k", 4096, 14336, 8, 2, 4096),
    ("mixtral-8x7b/16k", 4096, 14336, 8, 2, 16384),
    ("fine-grained/4k", 2048, 768, 128, 8, 4096),
    ("fine-grained/16k", 2048, 768, 128, 8, 16384),
]
SMOKE_SHAPES = [("tiny-mixtral", 32, 48, 4, 2, 24), ("tiny-fine", 32, 16, 16, 4, 16)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench_kernels.json", help="JSON path; the PNG is written beside it")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1 (torch vs triton)")
    p.add_argument("--shapes", default=None, help="comma-separated subset of shape names (default: all)")
    p.add_argument("--rep", type=int, default=200, help="do_bench rep time in ms (GPU)")
    p.add_argument("--smoke-reps", type=int, default=3, help="timed repetitions per method in --smoke mode")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ problem
def make_problem(torch, d, f, E, k, T, dtype, device, seed):
    """Hidden states, Mixtral-layout expert weights and softmax-top-k routing (weights renormalised)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device, dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * f, d, generator=g) * d ** -0.5).to(device, dtype).requires_grad_()
    down = (torch.randn(E, d, f, generator=g) * f ** -0.5).to(device, dtype).requires_grad_()
    logits = torch.randn(T, E, generator=g).to(device)
    w, top = torch.topk(logits.softmax(-1), k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    grad = torch.randn(T, d, generator=g).to(device, dtype)
    return dict(x=x, gate_up=gate_up, down=down, top=top, w=w, grad=grad, d=d, f=f, E=E, k=k, T=T)


def fwd_bwd(torch, forward, pb):
    """One training step of the block: returns (y, grads of x, both weights and the routing weights)."""
    leaves = [pb["x"], pb["gate_up"], pb["down"], pb["w"]]
    y = forward()
    return y, torch.autograd.grad(y, leaves, pb["grad"], allow_unused=True)


def hexamoe_op(torch, pb):
    from ds_hexamoe.kernels import custom_ops
    from ds_hexamoe.ops import build_expert_index

    def forward():
        index = build_expert_index(pb["top"], pb["E"])
        return custom_ops.expert_mlp(pb["x"], pb["gate_up"].transpose(1, 2), pb["down"].transpose(1, 2), index,
                                     row_scale=pb["w"].reshape(-1))
    return forward


def transformers_experts(torch, pb, implementation):
    import ds_hexamoe  # noqa: F401  registers the "hexamoe" experts implementation
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=pb["d"], intermediate_size=pb["f"], num_local_experts=pb["E"],
                        num_experts_per_tok=pb["k"])
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    del mod.gate_up_proj, mod.down_proj  # use the shared leaves, so every method differentiates the same tensors
    mod.gate_up_proj, mod.down_proj = pb["gate_up"], pb["down"]
    return lambda: mod(pb["x"], pb["top"], pb["w"])


def grouped_pipeline(torch, pb, gemm):
    """Sort, gather, two grouped GEMMs (``gemm(a, w[E, N, K], counts, offs_end) = a @ w[e]^T``), scale, combine."""
    F = torch.nn.functional
    k, E = pb["k"], pb["E"]

    def forward():
        ids, perm = torch.sort(pb["top"].reshape(-1))
        tok = perm // k
        counts = torch.bincount(ids, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = gemm(pb["x"][tok], pb["gate_up"], counts, offs)
        g, u = h.chunk(2, dim=-1)
        o = gemm(F.silu(g) * u, pb["down"], counts, offs) * pb["w"].reshape(-1)[perm].unsqueeze(-1)
        return torch.zeros_like(pb["x"]).index_add(0, tok, o)
    return forward


def deepspeed_triton(torch, pb):
    from deepspeed.ops.triton_ops.group_gemm_triton import group_gemm_triton

    return grouped_pipeline(torch, pb, lambda a, w, counts, offs: group_gemm_triton(a, w, offs, trans_b=True))


def megablocks(torch, pb):
    from grouped_gemm import ops as gg_ops  # the grouped GEMM MegaBlocks' dMoE runs on

    return grouped_pipeline(torch, pb, lambda a, w, counts, offs: gg_ops.gmm(a, w, counts.cpu(), trans_b=True))


def sonicmoe(torch, pb):
    from sonicmoe import KernelBackendMoE, MoE
    from sonicmoe.enums import ActivationType

    moe = MoE(num_experts=pb["E"], num_experts_per_tok=pb["k"], hidden_size=pb["d"], intermediate_size=pb["f"],
              activation_function=ActivationType.SWIGLU, add_bias=False, std=0.02).to(pb["x"].device, pb["x"].dtype)
    return lambda: moe(pb["x"], kernel_backend_moe=KernelBackendMoE.sonicmoe)[0]


METHODS = {  # grouped_mm first: it is the reference the others' outputs are compared with
    "grouped_mm": (lambda torch, pb: transformers_experts(torch, pb, "grouped_mm"), None),
    "hexamoe_op": (hexamoe_op, None),
    "hexamoe_transformers": (lambda torch, pb: transformers_experts(torch, pb, "hexamoe"), None),
    "deepspeed_triton": (deepspeed_triton, "deepspeed.ops.triton_ops.group_gemm_triton"),
    "megablocks": (megablocks, "megablocks"),
    "sonicmoe": (sonicmoe, "sonicmoe"),
}


def available(module: str | None) -> str | None:
    """None when usable, else why not."""
    if module is None:
        return None
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{module.split('.')[0]} is not installed"
        if module == "megablocks" and importlib.util.find_spec("grouped_gemm") is None:
            return "megablocks is installed without its grouped_gemm backend"
        if "." in module:
            importlib.import_module(module)
    except Exception as exc:  # a broken optional install must not stop the benchmark
        return f"{module} does not import: {type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------------------ GPU
def dense_limit_ms(torch, triton, P, d, f, device, rep) -> float:
    """One cuBLAS matmul ``[P, d] @ [d, 9f]``: 18*P*d*f FLOPs, those of the block's forward and backward."""
    a = torch.randn(P, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(d, 9 * f, device=device, dtype=torch.bfloat16)
    return triton.testing.do_bench(lambda: torch.mm(a, b), rep=rep, return_mode="median")


def run_gpu(args) -> dict:
    import torch
    import triton

    device = torch.device("cuda")
    shapes = [s for s in GPU_SHAPES if args.shapes is None or s[0] in args.shapes.split(",")]
    skipped = {name: why for name, (_, mod) in METHODS.items() if (why := available(mod))}
    rows = []
    for name, d, f, E, k, T in shapes:
        pb = make_problem(torch, d, f, E, k, T, torch.bfloat16, device, args.seed)
        flops = 18.0 * T * k * d * f  # fwd 6*P*d*f (three d x f GEMMs), bwd twice that
        dense_ms = dense_limit_ms(torch, triton, T * k, d, f, device, args.rep)
        rows.append(dict(shape=name, method="dense_limit", ms=dense_ms, tflops=flops / dense_ms / 1e9,
                         ratio_vs_dense=1.0, peak_mem_gib=None, max_abs_err=None, status="ok"))
        reference = None
        for method, (factory, _) in METHODS.items():
            if method in skipped:
                continue
            row = dict(shape=name, method=method, status="ok")
            try:
                forward = factory(torch, pb)
                step = lambda forward=forward, pb=pb: fwd_bwd(torch, forward, pb)  # noqa: E731
                y, _ = step()
                if method == "grouped_mm":
                    reference = y.detach().float()
                elif method != "sonicmoe" and reference is not None:
                    row["max_abs_err"] = (y.detach().float() - reference).abs().max().item()
                del y
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
                ms = triton.testing.do_bench(step, rep=args.rep, return_mode="median")
                row.update(ms=ms, tflops=flops / ms / 1e9, ratio_vs_dense=dense_ms / ms)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
            except Exception as exc:  # one failing baseline must not hide the others
                row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            torch.cuda.empty_cache()
        base_ms = next((r["ms"] for r in rows if r["shape"] == name and r["method"] == "grouped_mm" and "ms" in r), None)
        for r in rows:
            if r["shape"] == name and "ms" in r and base_ms:
                r["ratio_vs_grouped_mm"] = base_ms / r["ms"]
        del pb
        torch.cuda.empty_cache()
    return dict(mode="gpu", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                dtype="bfloat16", rows=rows, skipped=skipped)


# ------------------------------------------------------------------------------------------------ smoke
def run_smoke(args) -> dict:
    import torch
    import triton

    from ds_hexamoe.kernels import triton_ops
    from ds_hexamoe.ops import build_expert_index, expert_mlp, set_backend

    if not triton_ops.INTERPRETED:
        raise SystemExit("--smoke needs Triton's interpreter: TRITON_INTERPRET=1 was not in effect at import")
    # The GPU-mode code paths that run on CPU (DeepSpeed's grouped GEMM refuses CPU tensors): our op through
    # the interpreter, transformers' paths on their CPU implementations. Each is checked against the torch path.
    smoke_methods = ["hexamoe_op", "hexamoe_transformers", "grouped_mm"]
    skipped = {m: why for m in smoke_methods if (why := available(METHODS[m][1]))}
    rows = []
    for name, d, f, E, k, T in [s for s in SMOKE_SHAPES if args.shapes is None or s[0] in args.shapes.split(",")]:
        pb = make_problem(torch, d, f, E, k, T, torch.float32, torch.device("cpu"), args.seed)

        def torch_path():
            index = build_expert_index(pb["top"], E)
            return expert_mlp(pb["x"], pb["gate_up"].transpose(1, 2), pb["down"].transpose(1, 2), index,
                              row_scale=pb["w"].reshape(-1))

        def timed(forward):
            out, times = None, []
            for _ in range(max(args.smoke_reps, 1)):
                t0 = time.perf_counter()
                out = fwd_bwd(torch, forward, pb)
                times.append((time.perf_counter() - t0) * 1e3)
            return out, statistics.median(times)

        set_backend("torch")
        try:
            (y_ref, g_ref), torch_ms = timed(torch_path)
        finally:
            set_backend(None)
        rows.append(dict(shape=name, method="torch_path", ms=torch_ms, ratio_vs_torch=1.0, max_abs_err=0.0, status="ok"))
        for method in smoke_methods:
            if method in skipped:
                continue
            (y, g), ms = timed(METHODS[method][0](torch, pb))
            err = max([(y - y_ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g, g_ref)])
            rows.append(dict(shape=name, method=method, ms=ms, ratio_vs_torch=torch_ms / ms, max_abs_err=err,
                             status="ok"))
    return dict(mode="smoke", device="cpu (TRITON_INTERPRET=1)", torch=torch.__version__, triton=triton.__version__,
                dtype="float32", rows=rows, skipped=skipped, note="interpreter timings say nothing about GPU speed")


# ------------------------------------------------------------------------------------------------ output
def print_table(result: dict) -> None:
    cols = ["shape", "method", "ms", "tflops", "ratio_vs_dense", "ratio_vs_grouped_mm", "ratio_vs_torch",
            "peak_mem_gib", "max_abs_err", "status"]
    cols = [c for c in cols if any(c in r for r in result["rows"])]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in result["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print(f"device: {result['device']}  torch {result['torch']}  triton {result['triton']}  dtype {result['dtype']}")
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for method, why in result["skipped"].items():
        print(f"skipped {method}: {why}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "ratio_vs_torch" if result["mode"] == "smoke" else "tflops"
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(2.5 + 1.8 * len(shapes), 4))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [next((r.get(metric) or 0.0 for r in result["rows"] if r["shape"] == s and r["method"] == m), 0.0)
                for s in shapes]
        ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
    ax.set_ylabel("speed-up vs torch path" if metric == "ratio_vs_torch" else "TFLOP/s (fwd+bwd)")
    ax.set_title(f"MoE expert block, {result['dtype']}, {result['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels
    import torch

    if args.smoke:
        result = run_smoke(args)
    elif not torch.cuda.is_available():
        print("CUDA is not available: bench_kernels.py measures GPU kernels, so nothing was run. "
              "Run it on a CUDA machine, or use --smoke for the CPU interpreter check.")
        return 0
    else:
        result = run_gpu(args)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

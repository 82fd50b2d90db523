"""Every check that needs a GPU, in one run writing one JSON (driven by ``scripts/gpu_check.sh``).

    python scripts/gpu_check.py --json outputs/gpu_check.json [--sections kernels,bench_kernels,...]

Sections (each isolated: one failing records its error and the rest still run):
  kernels        Triton ESMM/ESTMM/ESS and the fused MLP (forward + backward) on CUDA, compiled (never the
                 interpreter), against the torch path, fp32/bf16/fp16, uneven and sentinel routing
  bench_kernels  scripts/bench_kernels.py at a Mixtral and a fine-grained shape: ratios to the dense cuBLAS
                 limit and to torch._grouped_mm, with the goals (>= 0.85 of dense, >= 1.2x grouped_mm)
  layer_memory   a transformers Mixtral block fwd+bwd: peak CUDA memory and time, hexamoe vs grouped_mm
  compile        torch.compile(fullgraph=True) of a tiny Mixtral on CUDA: graph breaks, logits/grads vs eager
  deepspeed      a one-rank DeepSpeed engine with FSSDP: 3 steps in bf16 and in fp16 (dynamic loss scaling)
  megatron       megatron-core's full MoELayer (router included) with the package's experts vs SequentialMLP
  zebra          the zebra pipeline on 2 ranks with NCCL groups (1 attention + 1 expert rank, then Asym-EA with
                 experts on the attention rank): loss and every gradient vs one process on the GPU; on one GPU
                 the 2 ranks share it if NCCL allows, otherwise the section records NCCL's refusal (not a pass)

Without a CUDA device nothing is measured: the JSON says ``"status": "no_gpu"`` and the exit code is 3.
Exit 0: every section ran and passed; 1: a section failed or missed a goal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import write_json  # noqa: E402  (a sibling script)

SECTIONS = ("kernels", "zebra", "bench_kernels", "layer_memory", "compile", "deepspeed", "megatron")
TIMEOUT_S = {"kernels": 90, "zebra": 60, "bench_kernels": 190, "layer_memory": 60, "compile": 90, "deepspeed": 90,
             "megatron": 60}
NO_GPU_EXIT = 3


def _rel(a, b) -> float:
    den = float(b.float().abs().max()) or 1.0
    return float((a.float() - b.float()).abs().max()) / den


# ------------------------------------------------------------------------------------------- kernels
def check_kernels(torch):
    from ds_hexamoe.kernels import triton_ops
    from ds_hexamoe.ops import build_expert_index, ess, estmm, expert_mlp, set_backend
    from ds_hexamoe.ops import esmm as esmm_op

    assert not triton_ops.INTERPRETED, "Triton is in interpreter mode: unset TRITON_INTERPRET"
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
    out, ok = {}, True
    for dtype in tol:
        for case, (T, k, E, d, f, sentinel) in {"uneven": (777, 2, 8, 256, 352, False),
                                                "sentinel_k8": (300, 8, 16, 128, 96, True)}.items():
            g = torch.Generator(device="cpu").manual_seed(0)
            dev = dict(device="cuda", dtype=dtype)
            x = torch.randn(T, d, generator=g).to(**dev)
            w1 = (torch.randn(E, 2 * f, d, generator=g) * d ** -0.5).to(**dev)
            w2 = (torch.randn(E, d, f, generator=g) * f ** -0.5).to(**dev)
            top = torch.randint(0, E + (2 if sentinel else 0), (T, k), generator=g).cuda()
            rs = torch.rand(T * k, generator=g).to(**dev)
            index = build_expert_index(top, E)
            dy = torch.randn(T, d, generator=g).to(**dev)
            res = {}
            for backend in ("triton", "torch"):
                set_backend(backend)
                try:
                    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, rs)]
                    y = expert_mlp(leaves[0], leaves[1].transpose(1, 2), leaves[2].transpose(1, 2), index,
                                   row_scale=leaves[3])
                    grads = torch.autograd.grad(y, leaves, dy)
                    h = esmm_op(x, w1.transpose(1, 2), index.idx, index.offs, gather_div=k, row_scale=rs)
                    dw = estmm(x, h, index.idx, index.offs, x_div=k)
                    db = ess(h, index.idx, index.offs, dy_scale=rs)
                    res[backend] = [y, *grads, h, dw, db]
                finally:
                    set_backend(None)
            names = ["y", "dx", "dw1", "dw2", "drouting", "esmm", "estmm", "ess"]
            errs = {n: _rel(a, b) for n, a, b in zip(names, res["triton"], res["torch"])}
            passed = all(e <= tol[dtype] for e in errs.values())
            ok &= passed
            out[f"{str(dtype).removeprefix('torch.')}/{case}"] = {"max_rel_err": errs, "tol": tol[dtype], "pass": passed}
    return ok, out


# ------------------------------------------------------------------------------------------- benchmarks
def check_bench_kernels(torch, out_dir):
    path = os.path.join(out_dir, "bench_kernels.json")
    cmd = [sys.executable, os.path.join(HERE, "bench_kernels.py"), "--out", path,
           "--shapes", "mixtral-8x7b/4k,fine-grained/4k", "--rep", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S["bench_kernels"] - 10, check=False)
    if proc.returncode != 0 or not os.path.exists(path):
        return False, {"returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    result = json.load(open(path))
    goals = {}
    for r in result.get("rows", []):
        if r.get("method") != "hexamoe_op":
            continue
        if r["shape"].startswith("mixtral"):
            goals[r["shape"]] = {"ratio_vs_dense": r.get("ratio_vs_dense"), "goal": 0.85,
                                 "met": (r.get("ratio_vs_dense") or 0) >= 0.85}
        else:
            goals[r["shape"]] = {"ratio_vs_grouped_mm": r.get("ratio_vs_grouped_mm"), "goal": 1.2,
                                 "met": (r.get("ratio_vs_grouped_mm") or 0) >= 1.2}
    ok = bool(goals) and all(g["met"] for g in goals.values())
    return ok, {"goals": goals, "rows": result.get("rows", [])}


def check_layer_memory(torch):
    import bench_layer

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        d, f, E, k, T = 1024, 2048, 8, 2, 8192
        x = torch.randn(1, T, d, device="cuda", dtype=dtype)
        row = {}
        for method in ("hexamoe", "grouped_mm"):
            block = bench_layer._mixtral_block(d, f, E, k, method).to("cuda", dtype)
            for _ in range(2):  # warm-up (autotuning), then the measured step
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                xi = x.detach().requires_grad_()
                block(xi).sum().backward()
                torch.cuda.synchronize()
                block.zero_grad(set_to_none=True)
            row[method] = {"peak_bytes": torch.cuda.max_memory_allocated() - base, "time_s": time.perf_counter() - t0}
            del block
        row["mem_ratio_vs_grouped_mm"] = row["hexamoe"]["peak_bytes"] / row["grouped_mm"]["peak_bytes"]
        row["time_ratio_vs_grouped_mm"] = row["hexamoe"]["time_s"] / row["grouped_mm"]["time_s"]
        out[str(dtype).removeprefix("torch.")] = row
    return all(r["mem_ratio_vs_grouped_mm"] <= 1.0 for r in out.values()), out


# ------------------------------------------------------------------------------------------- compile
def check_compile(torch):
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import hf_tiny

    cls = hf_tiny.candidate_classes("mixtral")[0]
    path = tempfile.mkdtemp()
    hf_tiny.build_tiny(cls, path)
    model = hf_tiny.load(cls, path, "hexamoe").cuda()
    ids = hf_tiny.input_ids(model).cuda()
    explained = torch._dynamo.explain(lambda i: model(input_ids=i).logits)(ids)
    torch._dynamo.reset()

    def step(run):
        model.zero_grad(set_to_none=True)
        logits = run(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    y_ref, g_ref = step(model)
    y_c, g_c = step(torch.compile(model, fullgraph=True))
    errs = {"logits": _rel(y_c, y_ref), "grads": max(_rel(a, b) for a, b in zip(g_c, g_ref))}
    out = {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count, "max_rel_err": errs,
           "break_reasons": [str(r.reason)[:300] for r in explained.break_reasons]}
    return explained.graph_break_count == 0 and max(errs.values()) <= 1e-4, out


# ------------------------------------------------------------------------------------------- distributed
def _one_rank_env():
    from ds_hexamoe.testing import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def check_deepspeed(torch):
    import deepspeed
    from transformers import MixtralConfig, MixtralForCausalLM

    import ds_hexamoe

    _one_rank_env()
    deepspeed.init_distributed("nccl")
    out, ok = {}, True
    for prec in ("bf16", "fp16"):
        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
        ds_cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1},
                  prec: {"enabled": True, **({"loss_scale": 0, "initial_scale_power": 12} if prec == "fp16" else {})},
                  "hexamoe": {"sharding": "fssdp"}, "steps_per_print": 10**9}
        engine, *_ = ds_hexamoe.initialize(model=MixtralForCausalLM(cfg), config=ds_cfg)
        losses = []
        for step in range(3):
            ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(step)).cuda()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        scale = getattr(getattr(engine, "optimizer", None), "cur_scale", None)
        good = all(map(lambda v: v == v and abs(v) < 1e4, losses))
        ok &= good
        out[prec] = {"losses": losses, "loss_scale": scale, "finite": good,
                     "experts_implementation": engine.module.config._experts_implementation}
        del engine
    return ok, out


def check_megatron(torch):
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ds_hexamoe.patches.megatron import convert_hf_mixtral_experts, convert_megatron_experts_to_hf, hexamoe_moe_spec

    _one_rank_env()
    torch.distributed.init_process_group("nccl")
    torch.cuda.set_device(0)
    ps.initialize_model_parallel(1, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                            moe_ffn_hidden_size=512, num_moe_experts=8, moe_router_topk=2, gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
                            moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, params_dtype=torch.float32)
    torch.manual_seed(0)
    ref = build_module(get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=False), config=cfg).cuda()
    ours = build_module(hexamoe_moe_spec(8), config=cfg).cuda()
    hf = convert_megatron_experts_to_hf({f"decoder.layers.0.mlp.{k}": v for k, v in ref.state_dict().items()})
    ours.load_state_dict({k.removeprefix("decoder.layers.0.mlp."): v.cuda()
                          for k, v in convert_hf_mixtral_experts(hf).items()})
    x = torch.randn(64, 4, 256, device="cuda")
    res = []
    for layer in (ref, ours):
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)  # the full MoELayer.forward, router gating included
        y.square().mean().backward()
        res.append((y.detach(), xi.grad, layer.router.weight.grad))
    errs = {n: _rel(b, a) for n, a, b in zip(("y", "dx", "drouter"), res[0], res[1])}
    return max(errs.values()) <= 1e-4, {"max_rel_err": errs}


def check_zebra(torch):
    from ds_hexamoe.testing import run_distributed
    from ds_hexamoe.testing.zebra import device_check_errors, device_check_rank

    try:
        ranks = run_distributed(device_check_rank, 2, "cuda", timeout=45, fresh=True)
    except RuntimeError as e:  # NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected")
        if torch.cuda.device_count() == 1 and "duplicate gpu" in str(e).lower():
            return False, {"ran": False, "reason": "NCCL refuses 2 ranks on one GPU (Duplicate GPU detected): "
                           "run on a machine with 2 GPUs", "error": str(e)[-2000:]}
        raise
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = device_check_errors(ranks, "cuda")
    ok = all(r["max_rel_err"] <= 1e-4 and r["backend"] == "nccl" for r in out.values())
    return ok, out


# ------------------------------------------------------------------------------------------- driver
def run_section(name: str, out_dir: str) -> dict:
    import torch

    t0 = time.perf_counter()
    try:
        fn = globals()[f"check_{name}"]
        ok, detail = fn(torch, out_dir) if name == "bench_kernels" else fn(torch)
        res = {"status": "pass" if ok else "fail", "detail": detail}
    except Exception as exc:  # noqa: BLE001  (a section's failure is its result)
        res = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="outputs/gpu_check.json")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--_section", dest="one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every section's time limit")
    args = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    if args.one:  # child: one section in its own process (own CUDA context and process group)
        print("GPU_CHECK_RESULT " + json.dumps(run_section(args.one, out_dir), default=str))
        return 0
    import torch

    report = {"torch": torch.__version__, "command": " ".join(sys.argv), "sections": {}}
    if not torch.cuda.is_available():
        report.update(status="no_gpu", device=None, message="no CUDA device is present: nothing was checked or "
                      "measured; run scripts/gpu_check.sh on a machine with an NVIDIA GPU")
        write_json(args.json, report)
        print(f"gpu_check: NO GPU PRESENT (torch.cuda.is_available() is False). Nothing was run. Wrote {args.json}.")
        return NO_GPU_EXIT
    report["device"] = torch.cuda.get_device_name(0)
    for name in args.sections.split(","):
        print(f"gpu_check: {name} ...", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--json", args.json, "--_section", name]
        limit = TIMEOUT_S.get(name, 120) * args.timeout_scale
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_RESULT ")]
            res = json.loads(line[-1].split(" ", 1)[1]) if line else {
                "status": "error", "error": f"exit {proc.returncode}", "stderr": proc.stderr[-4000:]}
        except subprocess.TimeoutExpired:
            res = {"status": "error", "error": f"timed out after {limit:.0f} s"}
        report["sections"][name] = res
        print(f"gpu_check: {name}: {res['status']} ({res.get('seconds', '-')} s) {res.get('error', '')}", flush=True)
        write_json(args.json, report, default=str)  # partial results survive a kill
    report["status"] = "pass" if all(r["status"] == "pass" for r in report["sections"].values()) else "fail"
    write_json(args.json, report, default=str)
    print(f"gpu_check: {report['status'].upper()} on {report['device']}; wrote {args.json}")
    return 0 if report["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())

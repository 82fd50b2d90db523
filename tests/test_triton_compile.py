"""Every Triton kernel of the package compiles to a cubin for sm80 and sm90 and fits the block's shared memory.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's whole
pipeline down to ptxas (bundled with Triton). The launches are the launchers' own: each job calls
``triton_ops.esmm/estmm/ess`` on meta tensors with the autotuned kernel swapped for a recorder, and the recorded
arguments become the signature, constexprs and divisibility attributes Triton's binder would give that launch.

Two sweeps per architecture: every autotune config (``autotune.gpu_configs``) in every dtype the launchers take
(fp32 with and without TF32, bf16, fp16; no kernel takes fp8, FP8 experts are dequantized to bf16 first) with every
option on, and every launch variant (options, weight layout, unaligned sizes with 256 experts) in bf16 at the
config with the largest shared-memory estimate. Compiles run in a fresh process (the kernels must be decorated
un-interpreted; ``tests/test_kernels.py`` sets ``TRITON_INTERPRET=1``) on a pool of workers. Triton's cache
(``TRITON_CACHE_DIR``) is used: a hit returns the cubin an identical compile produced.
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed: there is nothing to compile")

from ds_hexamoe.kernels import autotune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1800)  # a cold cache on two cores compiles ~200 kernels

ARCHS = (80, 90)  # opt-in shared memory per block: 163 KiB and 227 KiB (autotune.SHARED_LIMIT)
DTYPES = {"mm": ("float32", "float32-tf32", "bfloat16", "float16"), "sum": ("float32", "bfloat16", "float16")}
ITEMSIZE = {"float32": 4, "float32-tf32": 4, "bfloat16": 2, "float16": 2}
# The launchers' public options that become constexprs, and the operand layouts they are called with.
OPTIONS = {"esmm": ("gather", "scatter", "bias", "scale"), "estmm": ("x_gather", "dy_gather", "scale"),
           "ess": ("dy_gather", "scale")}
LAYOUTS = {"esmm": ("contiguous", "w_transposed"), "estmm": ("contiguous",), "ess": ("contiguous",)}
SHAPES = {"contiguous": (4096, 2, 8, 4096, 14336), "odd": (1000, 8, 256, 2056, 776)}  # T, k, E, K, N


def _config_name(cfg) -> str:
    tiles = "".join(f"{k[-1]}{v}" for k, v in cfg.kwargs.items())
    return f"{tiles}w{cfg.num_warps}s{cfg.num_stages}"


def _job(arch, kernel, config, dtype, options, layout) -> dict:
    cfg = autotune.gpu_configs(autotune.TUNING[kernel][0], divmod(arch, 10))[config]
    variant = "+".join(options) or "plain"
    return dict(id=f"sm{arch}-{kernel}-{_config_name(cfg)}-{dtype}-{variant}-{layout}", arch=arch, kernel=kernel,
                config=config, dtype=dtype, options=list(options), layout=layout)


def _largest(kind: str, arch: int) -> int:
    cfgs = autotune.gpu_configs(kind, divmod(arch, 10))
    return max(range(len(cfgs)), key=lambda i: autotune.shared_estimate(kind, cfgs[i], 2, divmod(arch, 10)))


def jobs() -> list[dict]:
    """Every (arch, kernel, config, dtype) the autotuner may run with all options on (``autotune.prune`` drops
    configs whose shared-memory estimate exceeds the arch's limit), then every launch variant in bf16."""
    out = []
    for arch, (kernel, (kind, _)) in itertools.product(ARCHS, autotune.TUNING.items()):
        cfgs = autotune.gpu_configs(kind, divmod(arch, 10))
        for config, dtype in itertools.product(range(len(cfgs)), DTYPES["sum" if kind == "sum" else "mm"]):
            if autotune.fits(kind, cfgs[config], divmod(arch, 10), ITEMSIZE[dtype]):
                out.append(_job(arch, kernel, config, dtype, OPTIONS[kernel], "contiguous"))
        variants = [(opts, layout) for n in range(len(OPTIONS[kernel]) + 1)
                    for opts in itertools.combinations(OPTIONS[kernel], n) for layout in LAYOUTS[kernel]]
        for opts, layout in variants + [(OPTIONS[kernel], "odd")]:
            if (opts, layout) != (OPTIONS[kernel], "contiguous"):
                out.append(_job(arch, kernel, _largest(kind, arch), "bfloat16", opts, layout))
    return out


JOBS = jobs()


# ------------------------------------------------------------------------ the compile worker (a fresh process)
def _call(job: dict):
    """The launcher call of ``job`` on meta tensors, as a thunk."""
    import torch

    from ds_hexamoe.kernels import triton_ops

    dt = getattr(torch, job["dtype"].split("-")[0])
    T, k, E, K, N = SHAPES["odd" if job["layout"] == "odd" else "contiguous"]
    opts = set(job["options"])

    def t(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    idx, offs, scale = t(T * k, dtype=torch.int64), t(E + 1, dtype=torch.int64), t(T * k) if "scale" in opts else None
    rows = {o: (T, k) if o in opts else (T * k, None) for o in ("gather", "x_gather", "dy_gather")}
    if job["kernel"] == "esmm":
        w = t(E, N, K).transpose(1, 2) if job["layout"] == "w_transposed" else t(E, K, N)
        return lambda: triton_ops.esmm(t(rows["gather"][0], K), w, idx, offs, gather_div=rows["gather"][1],
                                       scatter="scatter" in opts, bias=t(E, N) if "bias" in opts else None,
                                       row_scale=scale)
    if job["kernel"] == "estmm":
        return lambda: triton_ops.estmm(t(rows["x_gather"][0], K), t(rows["dy_gather"][0], N), idx, offs,
                                        x_div=rows["x_gather"][1], dy_div=rows["dy_gather"][1], dy_scale=scale)
    return lambda: triton_ops.ess(t(rows["dy_gather"][0], N), idx, offs, dy_div=rows["dy_gather"][1], dy_scale=scale)


def _record(job: dict) -> tuple[tuple, dict]:
    """The positional arguments and constexprs the launcher passes to the autotuned kernel for ``job``."""
    from unittest import mock

    import torch

    from ds_hexamoe.kernels import triton_ops

    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    torch.backends.cuda.matmul.allow_tf32 = job["dtype"].endswith("tf32")
    with mock.patch.object(triton_ops, "_tuned", lambda name, device: Recorder()):
        _call(job)()
    assert len(calls) == 1, f"{job['id']}: the launcher made {len(calls)} launches"
    return calls[0]


def _specialize(kernel, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes as Triton's binder derives them (``BaseBackend.get_*_specialization``):
    ints equal to 1 become constexprs, ints and pointers divisible by 16 get ``tt.divisibility`` (torch
    allocations are 16-byte aligned; meta tensors stand in for them)."""
    import torch

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}
    names = kernel.arg_names
    assert len(args) + len(constexprs) == len(names) and set(constexprs) == set(names[len(args):]), names
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name], aligned = "*" + types[value.dtype], True
        elif value == 1:
            signature[name], constants[name], aligned = "constexpr", 1, False
        else:
            signature[name], aligned = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    return {n: signature[n] for n in names}, constants, attrs


def compile_job(job: dict) -> dict:
    """Compile ``job`` for its architecture: ``{"shared", "cubin_bytes"}`` or ``{"error"}``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ds_hexamoe.kernels import triton_ops

    kernel = triton_ops.KERNELS[job["kernel"]]
    cfg = autotune.gpu_configs(autotune.TUNING[job["kernel"]][0], divmod(job["arch"], 10))[job["config"]]
    args, constexprs = _record(job)
    signature, constants, attrs = _specialize(kernel, args, {**constexprs, **cfg.kwargs})
    options = {k: v for k, v in cfg.all_kwargs().items() if k not in cfg.kwargs and v is not None}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                                  target=GPUTarget("cuda", job["arch"], 32), options=options)
    except Exception as exc:  # reported per job by the test, with the kernel, config, dtype and arch in its id
        return {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    return {"shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}


def _main(out: str) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(16, cpus or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = dict(zip((j["id"] for j in JOBS), pool.map(compile_job, JOBS)))
    Path(out).write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton_compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"the compile worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("job", JOBS, ids=[j["id"] for j in JOBS])
def test_compiles_to_cubin_within_shared_memory(compiled, job):
    result, limit = compiled[job["id"]], autotune.shared_limit(divmod(job["arch"], 10))
    assert "error" not in result, f"{job['id']} does not compile: {result.get('error')}"
    assert result["cubin_bytes"] > 0, f"{job['id']}: empty cubin"
    assert result["shared"] <= limit, (
        f"{job['id']} needs {result['shared']} bytes of shared memory per block; sm{job['arch']} allows {limit}: "
        "drop or shrink the config in kernels/autotune.py")


def test_estimate_bounds_compiled_shared_memory(compiled):
    """``autotune.shared_estimate`` (what pruning trusts) is never below what the compiler allocated."""
    for job in JOBS:
        result, kind = compiled[job["id"]], autotune.TUNING[job["kernel"]][0]
        cfg = autotune.gpu_configs(kind, divmod(job["arch"], 10))[job["config"]]
        if "shared" in result:
            cap = divmod(job["arch"], 10)
            assert result["shared"] <= autotune.shared_estimate(kind, cfg, ITEMSIZE[job["dtype"]], cap), job["id"]


def _named_args(dtype, n=4096, k=4096) -> dict:
    import torch

    t = torch.empty(0, dtype=dtype, device="meta")
    return {"X": t, "W": t, "DY": t, "N": n, "K": k}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["mm", "tmm", "sum"])
def test_prune_keeps_what_fits_shared_memory(arch, kind):
    """On a GPU, fp32 drops the tiles whose pipeline overflows shared memory; bf16/fp16 keep every config;
    the interpreter (no capability) and tiles already fitting are untouched."""
    import torch

    cap = divmod(arch, 10)
    cfgs = autotune.gpu_configs(kind, cap)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
        kept = autotune.prune(cfgs, _named_args(dtype), kind=kind, capability=cap)
        assert kept == [c for c in cfgs if autotune.shared_estimate(kind, c, size, cap) <= autotune.shared_limit(cap)]
        assert size == 4 or kept == cfgs, f"a {dtype} config of sm{arch} {kind} does not fit shared memory"
    assert autotune.prune(cfgs, _named_args(torch.float32), kind=kind) == cfgs


def test_prune_fallback_fits_every_gpu():
    """``prune`` falls back to a list's last config: it fits in fp32 on every capability ``SHARED_LIMIT`` knows."""
    for cap, kind in itertools.product(autotune.SHARED_LIMIT, ("mm", "tmm", "sum")):
        assert autotune.fits(kind, autotune.gpu_configs(kind, cap)[-1], cap, 4), (cap, kind)


def _jit_functions() -> set[str]:
    """Names of every ``@triton.jit`` function in the package's sources."""
    names = set()
    for path in itertools.chain(*(REPO.joinpath(d).rglob("*.py") for d in ("ds_hexamoe", "kernels", "patches"))):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_sweep_covers_every_kernel():
    """A new ``@triton.jit`` kernel must join ``triton_ops.KERNELS`` (and so this sweep) or be called by one."""
    import inspect

    from ds_hexamoe.kernels import triton_ops

    launched = {name: inspect.getsource(fn.fn) for name, fn in triton_ops.KERNELS.items()}
    assert set(launched) == set(autotune.TUNING) == {j["kernel"] for j in JOBS}
    kernel_names = {fn.fn.__name__ for fn in triton_ops.KERNELS.values()}
    helpers = _jit_functions() - kernel_names
    orphans = [h for h in helpers if not any(f"{h}(" in src for src in launched.values())]
    assert not orphans, f"@triton.jit functions neither launched nor called by a launched kernel: {orphans}"


if __name__ == "__main__":
    _main(sys.argv[1])

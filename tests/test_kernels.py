"""Triton kernels (ESMM, ESTMM, ESS, the fused expert MLP op) against the torch path and naive per-token loops.

Runs on CPU through Triton's interpreter. Triton picks interpreter vs compiler when a kernel is decorated,
so ``TRITON_INTERPRET=1`` is set before ``ds_hexamoe.kernels`` is imported, on machines without CUDA only
(Triton also reads it lazily at the first launch, so it stays set; without a GPU the interpreter is Triton's
only mode anyway). Where the kernels were already imported compiled (another test module first, or a CUDA
machine, where this file leaves the GPU kernels alone), the file re-runs itself in a fresh interpreter process.
"""
import os
import sys

# Triton imported earlier in compiled mode (by torch.compile's backends or megatron, from another test
# module) leaves its jit helpers unusable by the interpreter even though the env var is set below
_TRITON_PRELOADED = "triton" in sys.modules

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (see module docstring)

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import unittest.mock as mock  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ds_hexamoe.kernels import autotune, custom_ops, triton_ops  # noqa: E402
from ds_hexamoe.ops import build_expert_index, expert_linear, expert_mlp, set_backend, torch_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IN_PROCESS = triton_ops.INTERPRETED and not _TRITON_PRELOADED
needs_interp = pytest.mark.skipif(not IN_PROCESS, reason="kernels were imported compiled; see test_rerun_in_fresh_process")
pytestmark = pytest.mark.timeout(300)

K_DIM, N_DIM = 40, 48  # two K tiles and two N tiles of the interpreter config, both partial
BLOCK_M = autotune.INTERPRET_MM[0].kwargs["BLOCK_M"]

# name: (T, k, E). Segment lengths are uneven and several exceed BLOCK_M (the chunk-loop bug needs > 1 chunk).
SCENARIOS = {
    "uneven": (23, 2, 5),    # skewed: one expert takes about half of the pairs
    "empty": (17, 3, 7),     # only experts 1, 4, 5 used: empty first, middle and last segments
    "one": (37, 1, 4),       # every token to expert 2: one segment of 37 rows = 3 row tiles
    "k8": (9, 8, 10),        # top-8 of 10, distinct choices per token
    "sentinel": (19, 2, 4),  # expert-parallel sentinels (id == E): positions >= offs[-1]
}


def routing(name: str, seed: int = 0):
    """``top_k_index[T, k]``, routing weights ``[T, k]`` and the expert index for a scenario."""
    T, k, E = SCENARIOS[name]
    g = torch.Generator().manual_seed(seed)
    if name == "uneven":
        probs = torch.tensor([8.0, 1.0, 2.0, 0.5, 3.0])
        top = torch.multinomial(probs.expand(T, E), k, replacement=False, generator=g)
    elif name == "empty":
        used = torch.tensor([1, 4, 5])
        top = used[torch.multinomial(torch.ones(T, 3), k, replacement=False, generator=g)]
    elif name == "one":
        top = torch.full((T, k), 2)
    elif name == "k8":
        top = torch.multinomial(torch.ones(T, E), k, replacement=False, generator=g)
    else:
        top = torch.multinomial(torch.ones(T, E), k, replacement=False, generator=g)
        top[torch.rand(T, k, generator=g) < 0.3] = E
    weights = torch.rand(T, k, generator=g) + 0.1
    return top, weights, build_expert_index(top, E)


def make_weight(E, K, N, dtype, transposed, g):
    """``[E, K, N]``; ``transposed`` gives a ``[E, N, K]`` parameter's ``.transpose(1, 2)`` view, as callers pass."""
    scale = K ** -0.5
    if transposed:
        return (torch.randn(E, N, K, generator=g) * scale).to(dtype).transpose(1, 2)
    return (torch.randn(E, K, N, generator=g) * scale).to(dtype)


def tol(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
            torch.float16: dict(rtol=5e-3, atol=5e-3)}[dtype]


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype), msg=lambda m: f"{what}: {m}")


def close_norm(actual, expected, what, rel=2e-2):
    """Relative Frobenius error, for bf16 chains (h, a, dh rounded to bf16) where single elements may drift.

    Triton 3.9's interpreter also truncates fp32 -> bf16 on store (the GPU rounds to nearest), which doubles
    the rounding error on CPU; a wrong kernel is off by O(1), far above 2%.
    """
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
    assert err < rel, f"{what}: relative error {err:.3g} >= {rel}"


# ------------------------------------------------------------------------------ naive per-token loops (fp64)
def naive_esmm(x, w, idx, offs, gather_div=None, scatter=False, bias=None, row_scale=None):
    y = torch.zeros(idx.numel(), w.size(2), dtype=torch.float64)
    for e in range(w.size(0)):
        for p in range(int(offs[e]), int(offs[e + 1])):
            pair = int(idx[p])
            row = p if gather_div is None else pair // gather_div
            v = x[row].to(w.dtype).double() @ w[e].double()
            if bias is not None:
                v = v + bias[e].double()
            if row_scale is not None:
                v = v * float(row_scale[pair])
            y[pair if scatter else p] = v
    return y


def naive_estmm(x, dy, idx, offs, x_div=None, dy_div=None, dy_scale=None):
    E = offs.numel() - 1
    dw = torch.zeros(E, x.size(1), dy.size(1), dtype=torch.float64)
    for e in range(E):
        for p in range(int(offs[e]), int(offs[e + 1])):
            pair = int(idx[p])
            xr = x[p if x_div is None else pair // x_div].double()
            g = dy[p if dy_div is None else pair // dy_div].double()
            if dy_scale is not None:
                g = g * float(dy_scale[pair])
            dw[e] += torch.outer(xr, g)
    return dw


def naive_ess(dy, idx, offs, dy_div=None, dy_scale=None):
    E = offs.numel() - 1
    db = torch.zeros(E, dy.size(1), dtype=torch.float64)
    for e in range(E):
        for p in range(int(offs[e]), int(offs[e + 1])):
            pair = int(idx[p])
            g = dy[p if dy_div is None else pair // dy_div].double()
            db[e] += g if dy_scale is None else g * float(dy_scale[pair])
    return db


def naive_moe(x, w1, w2, top, weights, act, gated, interleaved, b1=None, b2=None, scaled=True):
    """``sum_j s[t, j] * expert_{e[t, j]}(x[t])``, token by token (differentiable, dtype of the inputs)."""
    from test_ops import ref_moe

    return ref_moe(x, w1, w2, top, act=act, gated=gated, interleaved=interleaved, b1=b1, b2=b2,
                   row_scale=weights.reshape(-1) if scaled else None)


# ----------------------------------------------------------------------------------------- forward kernels
ESMM_FLAGS = {
    "expert_order": dict(gather_div=None, scatter=False, bias=False, scale=False),
    "gather_k_bias": dict(gather_div="k", scatter=False, bias=True, scale=False),
    "gather_k_scatter_bias_scale": dict(gather_div="k", scatter=True, bias=True, scale=True),
    "pair_order_scatter_scale": dict(gather_div=1, scatter=True, bias=False, scale=True),
    "expert_order_scatter": dict(gather_div=None, scatter=True, bias=False, scale=False),
}


def esmm_case(scenario, flags, dtype=torch.float32, transposed=True, x_dtype=None, seed=0):
    top, weights, index = routing(scenario, seed)
    T, k, E = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(seed + 1)
    f = ESMM_FLAGS[flags]
    div = k if f["gather_div"] == "k" else f["gather_div"]
    rows = {None: T * k, 1: T * k}.get(div, T)
    x = torch.randn(rows, K_DIM, generator=g).to(x_dtype or dtype)
    w = make_weight(E, K_DIM, N_DIM, dtype, transposed, g)
    kw = dict(gather_div=div, scatter=f["scatter"])
    if f["bias"]:
        kw["bias"] = torch.randn(E, N_DIM, generator=g).to(dtype)
    if f["scale"]:
        kw["row_scale"] = weights.reshape(-1)
    return x, w, index, kw


@needs_interp
@pytest.mark.parametrize("flags", list(ESMM_FLAGS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_esmm_matches_torch_and_loop(scenario, flags):
    x, w, index, kw = esmm_case(scenario, flags, transposed=(flags != "expert_order"))
    y = triton_ops.esmm(x, w, index.idx, index.offs, **kw)
    assert y.shape == (index.num_pairs, N_DIM) and y.dtype == torch.float32
    close(y, naive_esmm(x, w, index.idx, index.offs, **kw), torch.float32, "esmm vs loop")
    close(y, torch_ops.esmm(x, w, index.idx, index.offs, **kw), torch.float32, "esmm vs torch")
    n_valid = int(index.offs[-1])
    if n_valid < index.num_pairs:  # sentinel rows are exact zeros, in either output order
        dead = index.idx[n_valid:] if kw["scatter"] else torch.arange(n_valid, index.num_pairs)
        assert torch.count_nonzero(y[dead]) == 0


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scenario", ["uneven", "sentinel"])
def test_esmm_half_precision(scenario, dtype):
    x, w, index, kw = esmm_case(scenario, "gather_k_scatter_bias_scale", dtype=dtype)
    y = triton_ops.esmm(x, w, index.idx, index.offs, **kw)
    assert y.dtype == dtype  # bf16 stays bf16: no silent downcast to fp16
    close(y, naive_esmm(x, w, index.idx, index.offs, **kw), dtype, "esmm vs loop")
    close(y, torch_ops.esmm(x, w, index.idx, index.offs, **kw), dtype, "esmm vs torch")


@needs_interp
def test_esmm_mixed_dtypes_follow_torch_path():
    """fp32 activations against bf16 weights: x is cast to w's dtype; an fp32 bias promotes the output."""
    x, w, index, kw = esmm_case("uneven", "gather_k_bias", dtype=torch.bfloat16, x_dtype=torch.float32)
    kw["bias"] = kw["bias"].float()
    y = triton_ops.esmm(x, w, index.idx, index.offs, **kw)
    ref = torch_ops.esmm(x, w, index.idx, index.offs, **kw)
    assert y.dtype == ref.dtype == torch.float32
    close(y, ref, torch.bfloat16, "esmm mixed")


# ---------------------------------------------------------------------------------------- backward kernels
ESTMM_FLAGS = {
    "expert_order": dict(x_div=None, dy_div=None, scale=False),
    "x_tokens": dict(x_div="k", dy_div=None, scale=False),           # dW1 = ESTMM(x, dh)
    "dy_tokens_scaled": dict(x_div=None, dy_div="k", scale=True),    # dW2 = ESTMM(a, dout * s)
    "pair_order_scaled": dict(x_div=1, dy_div=1, scale=True),
}


def estmm_case(scenario, flags, dtype=torch.float32, seed=0):
    top, weights, index = routing(scenario, seed)
    T, k, E = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(seed + 2)
    f = ESTMM_FLAGS[flags]
    x_div, dy_div = (k if f[n] == "k" else f[n] for n in ("x_div", "dy_div"))
    x = torch.randn(T if x_div not in (None, 1) else T * k, K_DIM, generator=g).to(dtype)
    dy = torch.randn(T if dy_div not in (None, 1) else T * k, N_DIM, generator=g).to(dtype)
    kw = dict(x_div=x_div, dy_div=dy_div, dy_scale=weights.reshape(-1) if f["scale"] else None)
    return x, dy, index, kw


@needs_interp
@pytest.mark.parametrize("flags", list(ESTMM_FLAGS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_estmm_matches_torch_and_loop(scenario, flags):
    x, dy, index, kw = estmm_case(scenario, flags)
    dw = triton_ops.estmm(x, dy, index.idx, index.offs, **kw)
    assert dw.shape == (index.num_experts, K_DIM, N_DIM) and dw.dtype == torch.float32
    close(dw, naive_estmm(x, dy, index.idx, index.offs, **kw), torch.float32, "estmm vs loop")
    close(dw, torch_ops.estmm(x, dy, index.idx, index.offs, **kw), torch.float32, "estmm vs torch")
    empty = index.counts == 0
    assert torch.count_nonzero(dw[empty]) == 0


@needs_interp
@pytest.mark.parametrize("flags", ["expert_order", "dy_tokens_scaled", "pair_order_scaled"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ess_matches_torch_and_loop(scenario, flags):
    _, dy, index, kw = estmm_case(scenario, flags)
    kw.pop("x_div")
    db = triton_ops.ess(dy, index.idx, index.offs, **kw)
    assert db.shape == (index.num_experts, N_DIM) and db.dtype == torch.float32
    close(db, naive_ess(dy, index.idx, index.offs, **kw), torch.float32, "ess vs loop")
    close(db, torch_ops.ess(dy, index.idx, index.offs, **kw), torch.float32, "ess vs torch")


@needs_interp
def test_reductions_cover_every_chunk_once():
    """HEXA-MoE's loops add the first 16-row chunk twice and drop the last: all-ones make that visible exactly."""
    _, _, index = routing("one")  # one segment of 37 rows, 3 chunks of BLOCK_M
    assert int(index.counts.max()) > 2 * BLOCK_M
    ones_x = torch.ones(index.num_pairs, 16)
    ones_dy = torch.ones(index.num_pairs, 16)
    dw = triton_ops.estmm(ones_x, ones_dy, index.idx, index.offs)
    db = triton_ops.ess(ones_dy, index.idx, index.offs)
    assert torch.equal(dw[:, 0, 0], index.counts.float())
    assert torch.equal(db[:, 0], index.counts.float())


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_estmm_ess_half_precision(dtype):
    x, dy, index, kw = estmm_case("uneven", "dy_tokens_scaled", dtype=dtype)
    dw = triton_ops.estmm(x, dy, index.idx, index.offs, **kw)
    assert dw.dtype == dtype
    close(dw, naive_estmm(x, dy, index.idx, index.offs, **kw), dtype, "estmm vs loop")
    kw.pop("x_div")
    db = triton_ops.ess(dy, index.idx, index.offs, **kw)
    assert db.dtype == dtype
    close(db, naive_ess(dy, index.idx, index.offs, **kw), dtype, "ess vs loop")


@needs_interp
def test_no_host_sync():
    """No ``.item()``/``.tolist()``/``int(tensor)`` anywhere in the three launchers (the guard trips the torch path)."""
    x, w, index, kw = esmm_case("uneven", "gather_k_scatter_bias_scale")

    def sync(*_a, **_k):
        raise AssertionError("host sync")

    guards = [mock.patch.object(torch.Tensor, m, sync) for m in ("item", "tolist", "__int__", "__bool__", "__index__")]
    for gd in guards:
        gd.start()
    try:
        y = triton_ops.esmm(x, w, index.idx, index.offs, **kw)
        triton_ops.estmm(x, y, index.idx, index.offs, x_div=2, dy_div=1, dy_scale=kw["row_scale"])
        triton_ops.ess(y, index.idx, index.offs, dy_div=1)
        with pytest.raises(AssertionError, match="host sync"):
            torch_ops.esmm(x, w, index.idx, index.offs, **kw)
    finally:
        for gd in guards:
            gd.stop()


# ------------------------------------------------------------------------------------------ gradients
MLP_CASES = {
    # name: (scenario, act, gated, interleaved, biases, scaled, dtype)
    "mixtral_silu": ("uneven", "silu", True, False, False, True, torch.float32),
    "interleaved_gelu_tanh": ("k8", "gelu_pytorch_tanh", True, True, False, True, torch.float32),
    "swin_gelu_bias": ("empty", "gelu", False, False, True, True, torch.float32),
    "sentinel_bias": ("sentinel", "silu", True, False, True, True, torch.float32),
    "one_expert_unscaled": ("one", "relu", False, False, True, False, torch.float32),
    "bf16": ("uneven", "silu", True, False, True, True, torch.bfloat16),
}
D_MODEL, F_HID = 32, 24


def mlp_case(name, seed=0):
    scenario, act, gated, interleaved, biases, scaled, dtype = MLP_CASES[name]
    top, weights, index = routing(scenario, seed)
    T, k, E = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(seed + 3)
    f1 = 2 * F_HID if gated else F_HID
    leaves = {
        "x": torch.randn(T, D_MODEL, generator=g),
        "w1": torch.randn(E, f1, D_MODEL, generator=g) * D_MODEL ** -0.5,  # transformers' [E, out, in]
        "w2": torch.randn(E, D_MODEL, F_HID, generator=g) * F_HID ** -0.5,
        "b1": torch.randn(E, f1, generator=g) if biases else None,
        "b2": torch.randn(E, D_MODEL, generator=g) if biases else None,
        "rs": weights.reshape(-1).clone() if scaled else None,
    }
    leaves = {n: (t.to(dtype).requires_grad_() if t is not None else None) for n, t in leaves.items()}
    return top, index, leaves, dict(act=act, gated=gated, interleaved=interleaved), dtype


def run_mlp(fn, index, leaves, opts):
    L = leaves
    y = fn(L["x"], L["w1"].transpose(1, 2), L["w2"].transpose(1, 2), index,
           b1=L["b1"], b2=L["b2"], row_scale=L["rs"], **opts)
    names = [n for n, t in L.items() if t is not None]
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    grads = torch.autograd.grad(y, [L[n] for n in names], grad_out)
    return y, dict(zip(names, grads)), grad_out


def naive_mlp_grads(top, leaves, opts, grad_out):
    L64 = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in leaves.items()}
    k = top.size(1)
    weights = L64["rs"].view(-1, k) if L64["rs"] is not None else None
    y = naive_moe(L64["x"], L64["w1"].transpose(1, 2), L64["w2"].transpose(1, 2), top, weights,
                  b1=L64["b1"], b2=L64["b2"], scaled=weights is not None, **opts)
    names = [n for n, t in L64.items() if t is not None]
    grads = torch.autograd.grad(y, [L64[n] for n in names], grad_out.double())
    return y, dict(zip(names, grads))


@needs_interp
@pytest.mark.parametrize("name", list(MLP_CASES))
@pytest.mark.parametrize("path", ["custom_op", "backend"])
def test_expert_mlp_gradients(name, path):
    """Fused MLP through ``hexamoe::expert_mlp`` or ``ops.expert_mlp`` on the triton backend: loop and torch path."""
    top, index, leaves, opts, dtype = mlp_case(name)
    set_backend("triton")
    try:
        y, grads, grad_out = run_mlp(custom_ops.expert_mlp if path == "custom_op" else expert_mlp, index, leaves, opts)
    finally:
        set_backend(None)
    set_backend("torch")
    try:
        y_ref, grads_ref, _ = run_mlp(expert_mlp, index, leaves, opts)
    finally:
        set_backend(None)
    y_loop, grads_loop = naive_mlp_grads(top, leaves, opts, grad_out)
    check = (lambda a, b, what: close(a, b, dtype, what)) if dtype == torch.float32 else close_norm
    assert y.dtype == dtype
    check(y, y_loop, "y vs loop")
    check(y, y_ref, "y vs torch")
    assert grads.keys() == grads_loop.keys()
    for n in grads:
        assert grads[n].dtype == leaves[n].dtype, n
        check(grads[n], grads_loop[n], f"d{n} vs loop")
        check(grads[n], grads_ref[n], f"d{n} vs torch")


LINEAR_FLAGS = {
    "gather_tokens_bias_scale": dict(gather="k", scatter=False, bias=True, scale=True),
    "expert_order_scatter_scale": dict(gather=None, scatter=True, bias=True, scale=True),
    "pair_order_plain": dict(gather=1, scatter=False, bias=False, scale=False),
}


@needs_interp
@pytest.mark.parametrize("scenario,flags", [("uneven", f) for f in LINEAR_FLAGS] + [
    ("sentinel", "gather_tokens_bias_scale"), ("sentinel", "expert_order_scatter_scale"), ("k8", "pair_order_plain")])
def test_expert_linear_gradients(scenario, flags):
    """``ops.expert_linear`` on the triton backend: output and all four gradients against the torch backend."""
    top, weights, index = routing(scenario)
    T, k, E = SCENARIOS[scenario]
    f = LINEAR_FLAGS[flags]
    div = k if f["gather"] == "k" else f["gather"]
    g = torch.Generator().manual_seed(11)
    leaves = {
        "x": torch.randn(T if div == k else T * k, K_DIM, generator=g).requires_grad_(),
        "w": torch.randn(E, N_DIM, K_DIM, generator=g).mul(K_DIM ** -0.5).requires_grad_(),
        "bias": torch.randn(E, N_DIM, generator=g).requires_grad_() if f["bias"] else None,
        "row_scale": weights.reshape(-1).clone().requires_grad_() if f["scale"] else None,
    }
    names = [n for n, t in leaves.items() if t is not None]
    grad_out = torch.randn(index.num_pairs, N_DIM, generator=g)
    results = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        try:
            y = expert_linear(leaves["x"], leaves["w"].transpose(1, 2), index, gather_div=div, scatter=f["scatter"],
                              bias=leaves["bias"], row_scale=leaves["row_scale"])
            results[backend] = (y, torch.autograd.grad(y, [leaves[n] for n in names], grad_out))
        finally:
            set_backend(None)
    (y, grads), (y_ref, grads_ref) = results["triton"], results["torch"]
    close(y, y_ref, torch.float32, "y")
    kw = dict(gather_div=div, scatter=f["scatter"], bias=leaves["bias"], row_scale=leaves["row_scale"])
    close(y, naive_esmm(leaves["x"].detach(), leaves["w"].detach().transpose(1, 2), index.idx, index.offs,
                        **{n: (v.detach() if torch.is_tensor(v) else v) for n, v in kw.items()}), torch.float32, "y loop")
    for n, a, b in zip(names, grads, grads_ref):
        close(a, b, torch.float32, f"d{n}")


# ------------------------------------------------------------------------------------------ torch.compile
@needs_interp
def test_torch_compile_traces_registered_ops():
    """``aot_autograd`` with fullgraph: the forward graph holds ``hexamoe.expert_mlp``, the backward its backward op."""
    from torch._dynamo.backends.common import aot_autograd

    top, index, leaves, opts, _ = mlp_case("sentinel_bias")
    graphs = {}

    def record(kind):
        def compiler(gm, _example):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return gm
        return compiler

    def layer(x, w1, w2, b1, b2, rs, idx, offs):
        return custom_ops.expert_mlp_op(x, w1.transpose(1, 2), w2.transpose(1, 2), idx, offs, index.k,
                                        opts["act"], opts["gated"], opts["interleaved"], b1, b2, rs)[0]

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw")),
                             fullgraph=True)
    L = leaves
    names = ["x", "w1", "w2", "b1", "b2", "rs"]
    y = compiled(*(L[n] for n in names), index.idx, index.offs)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, [L[n] for n in names], grad_out)
    assert "hexamoe.expert_mlp.default" in graphs["fw"]
    assert "hexamoe.expert_mlp_backward.default" in graphs["bw"]
    y_eager = layer(*(L[n] for n in names), index.idx, index.offs)
    grads_eager = torch.autograd.grad(y_eager, [L[n] for n in names], grad_out)
    close(y, y_eager, torch.float32, "compiled y")
    for n, a, b in zip(names, grads, grads_eager):
        close(a, b, torch.float32, f"compiled d{n}")


@needs_interp
def test_opcheck_registrations():
    """Schema, fake (meta) kernels and autograd registration agree with the real ops."""
    x, w, index, kw = esmm_case("sentinel", "gather_k_scatter_bias_scale")
    torch.library.opcheck(torch.ops.hexamoe.esmm.default, (x, w, index.idx, index.offs), kw)
    xe, dy, index, kwt = estmm_case("sentinel", "dy_tokens_scaled")
    torch.library.opcheck(torch.ops.hexamoe.estmm.default, (xe, dy, index.idx, index.offs), kwt)
    torch.library.opcheck(torch.ops.hexamoe.ess.default, (dy, index.idx, index.offs),
                          dict(dy_div=kwt["dy_div"], dy_scale=kwt["dy_scale"]))


def test_custom_ops_use_triton_under_interpreter():
    assert custom_ops.backend_for(torch.device("cpu")) == ("triton" if triton_ops.INTERPRETED else "torch")


# ------------------------------------------------------------------------------------------ bad input
def _bad_inputs():
    x, w, index, kw = esmm_case("uneven", "gather_k_scatter_bias_scale")
    idx, offs = index.idx, index.offs
    return [
        ("w must be \\[E, K, N\\]", lambda: triton_ops.esmm(x, w[0], idx, offs, gather_div=2)),
        ("transpose", lambda: triton_ops.esmm(x, w.transpose(1, 2), idx, offs, gather_div=2)),
        ("offs has", lambda: triton_ops.esmm(x, w, idx, offs[:-1], gather_div=2)),
        ("bias must be", lambda: triton_ops.esmm(x, w, idx, offs, gather_div=2, bias=kw["bias"][:, :3])),
        ("row_scale must be", lambda: triton_ops.esmm(x, w, idx, offs, gather_div=2, row_scale=kw["row_scale"][:5])),
        ("gather_div must be", lambda: triton_ops.esmm(x, w, idx, offs, gather_div=0)),
        ("idx must be", lambda: triton_ops.esmm(x, w, idx.float(), offs, gather_div=2)),
        ("float64", lambda: triton_ops.esmm(x.double(), w.double(), idx, offs, gather_div=2)),
        ("dy must be 2-D", lambda: triton_ops.estmm(x, x[0], idx, offs)),
        ("dy_scale must be", lambda: triton_ops.ess(x, idx, offs, dy_scale=kw["row_scale"][1:])),
        ("activation 'swiglu9'", lambda: custom_ops.expert_mlp(x, w, w, index, act="swiglu9")),
        ("idx must hold T\\*k", lambda: custom_ops.expert_mlp(x[:-1], w, torch.zeros(5, 24, 40), index)),
        ("w2 must be", lambda: custom_ops.expert_mlp(x, w, w, index)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_input_names_the_field(case):
    pattern, call = _bad_inputs()[case]
    with pytest.raises((ValueError, TypeError), match=pattern):
        call()


def test_import_error_without_triton():
    """Without Triton the module raises ImportError (not a crash), so the dispatcher falls back to torch."""
    from ds_hexamoe.ops import dispatch

    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n == "triton" or n.startswith("triton.")
             or n in ("ds_hexamoe.kernels.triton_ops", "ds_hexamoe.kernels.autotune")}
    try:
        sys.modules["triton"] = None  # import triton -> ImportError
        with pytest.raises(ImportError, match="needs Triton"):
            importlib.import_module("ds_hexamoe.kernels.triton_ops")
        assert dispatch.triton_available() is False
    finally:
        sys.modules.pop("triton", None)
        sys.modules.update(saved)
        import ds_hexamoe.kernels as pkg
        pkg.triton_ops = saved.get("ds_hexamoe.kernels.triton_ops", triton_ops)


# ------------------------------------------------------------------------------------------ benchmark script
def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_interp
def test_bench_script_smoke(tmp_path, capsys, monkeypatch):
    """``--smoke`` (in this process: the interpreter is already on) checks every CPU-capable path against torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() sets it; monkeypatch restores the previous value
    out = tmp_path / "bench.json"
    assert _bench_module().main(["--smoke", "--smoke-reps", "1", "--shapes", "tiny-mixtral", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "smoke"
    assert {r["method"] for r in data["rows"]} >= {"torch_path", "hexamoe_op", "grouped_mm"}
    for row in data["rows"]:
        assert row["max_abs_err"] < 1e-3, row
        assert row["ratio_vs_torch"] > 0
    assert (tmp_path / "bench.png").exists()
    assert "hexamoe_op" in capsys.readouterr().out


def test_bench_script_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU benchmark would run")
    assert _bench_module().main(["--out", str(tmp_path / "g.json")]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert not (tmp_path / "g.json").exists()


# ------------------------------------------------------------------------------------------ import order
@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process under the interpreter")
@pytest.mark.timeout(700)
def test_rerun_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]

"""ESMM / ESTMM / ESS and the expert autograd functions against naive per-pair Python loops.

The references below never use the grouped kernels: they walk the ``T*k`` (token, expert) pairs one
by one, so a wrong segment bound, a doubled tile or a dropped row shows up as a numeric mismatch.
"""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.ops import build_expert_index, expert_linear, expert_mlp, torch_ops
from ds_hexamoe.ops.activations import get_activation

E = 5  # experts in most cases: odd so segments never line up with anything by accident

TOL = {  # (rtol, atol) against a fp64 reference computed from the same (rounded) inputs
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
}


# ---------------------------------------------------------------- routing patterns
def make_routing(T: int, k: int, num_experts: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """``top_k_index[T, k]`` for a named load pattern."""
    if pattern == "uniform":
        return torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(T)])
    if pattern == "skewed":  # expert 0 hot, expert 3 never chosen, uneven segments
        probs = torch.tensor([8.0, 1.0, 3.0, 0.0, 2.0][:num_experts] + [1.0] * max(0, num_experts - 5))
        probs[3 % num_experts] = 0.0
        return torch.stack([torch.multinomial(probs, k, replacement=False, generator=gen) for _ in range(T)])
    if pattern == "one_expert":  # every pair to expert 2 (duplicates within a token when k > 1)
        return torch.full((T, k), 2 % num_experts, dtype=torch.int64)
    if pattern == "sentinel":  # expert-parallel style: ids >= E mark pairs that are not ours
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(T)])
        drop = torch.rand(T, k, generator=gen) < 0.35
        return torch.where(drop, num_experts + torch.randint(0, 3, (T, k), generator=gen), idx)
    raise ValueError(pattern)


PATTERNS = ["uniform", "skewed", "one_expert", "sentinel"]


# ---------------------------------------------------------------- naive references
def pair_positions(idx: torch.Tensor) -> list[int]:
    """``pos[q]``: where pair ``q`` sits in expert order."""
    pos = [0] * idx.numel()
    for p, q in enumerate(idx.tolist()):
        pos[q] = p
    return pos


def ref_esmm(x, w, top_k_index, idx, *, gather_div=None, scatter=False, bias=None, row_scale=None):
    """Row-by-row ``(X[row] @ W[e] + b[e]) * s[q]`` for every valid pair ``q``; invalid rows are zero."""
    num_experts = w.size(0)
    experts = top_k_index.reshape(-1).tolist()
    pos = pair_positions(idx)
    rows = [None] * len(experts)
    for q, e in enumerate(experts):
        out_row = q if scatter else pos[q]
        if e >= num_experts:
            continue
        in_row = pos[q] if gather_div is None else q // gather_div
        y = x[in_row] @ w[e]
        if bias is not None:
            y = y + bias[e]
        if row_scale is not None:
            y = y * row_scale[q]
        rows[out_row] = y
    zero = x.new_zeros(w.size(2))
    return torch.stack([zero if r is None else r for r in rows])


def ref_estmm(x, dy, top_k_index, idx, num_experts, *, x_div=None, dy_div=None, dy_scale=None):
    experts = top_k_index.reshape(-1).tolist()
    pos = pair_positions(idx)
    out = x.new_zeros(num_experts, x.size(1), dy.size(1))
    for q, e in enumerate(experts):
        if e >= num_experts:
            continue
        xr = x[pos[q] if x_div is None else q // x_div]
        gr = dy[pos[q] if dy_div is None else q // dy_div]
        if dy_scale is not None:
            gr = gr * dy_scale[q]
        out[e] += torch.outer(xr, gr)
    return out


def ref_ess(dy, top_k_index, idx, num_experts, *, dy_div=None, dy_scale=None):
    experts = top_k_index.reshape(-1).tolist()
    pos = pair_positions(idx)
    out = dy.new_zeros(num_experts, dy.size(1))
    for q, e in enumerate(experts):
        if e >= num_experts:
            continue
        gr = dy[pos[q] if dy_div is None else q // dy_div]
        out[e] += gr if dy_scale is None else gr * dy_scale[q]
    return out


def ref_moe(x, w1, w2, top_k_index, *, act, gated, interleaved, b1=None, b2=None, row_scale=None):
    """``out[t] = sum_j s[t, j] * expert_{e[t, j]}(x[t])``, one token and one choice at a time."""
    fn, _ = get_activation(act)
    num_experts = w1.size(0)
    T, k = top_k_index.shape
    outs = []
    for t in range(T):
        acc = x.new_zeros(w2.size(2))
        for j in range(k):
            e = int(top_k_index[t, j])
            if e >= num_experts:
                continue
            h = x[t] @ w1[e] + (b1[e] if b1 is not None else 0)
            if gated:
                g, u = (h[0::2], h[1::2]) if interleaved else h.chunk(2)
                a = fn(g) * u
            else:
                a = fn(h)
            y = a @ w2[e] + (b2[e] if b2 is not None else 0)
            acc = acc + (y * row_scale[t * k + j] if row_scale is not None else y)
        outs.append(acc)
    return torch.stack(outs)


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def rand(*shape, dtype, gen, requires_grad=False):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def fp64_leaf(t):
    return t.detach().double().requires_grad_(t.requires_grad)


# ---------------------------------------------------------------- build_expert_index
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_build_expert_index_properties(pattern, k):
    gen = torch.Generator().manual_seed(k)
    num_experts = max(E, k)
    T = 13
    top = make_routing(T, k, num_experts, pattern, gen)
    index = build_expert_index(top, num_experts)
    flat = top.reshape(-1)
    P = T * k
    assert index.k == k and index.num_pairs == P and index.num_experts == num_experts
    assert index.idx.dtype == torch.int64 and index.offs.dtype == torch.int64
    assert sorted(index.idx.tolist()) == list(range(P)), "idx must be a permutation of the pairs"
    valid = flat < num_experts
    assert int(index.offs[0]) == 0 and int(index.offs[-1]) == int(valid.sum())
    assert torch.equal(index.counts, torch.bincount(flat[valid], minlength=num_experts))
    assert torch.equal(index.offs.diff(), index.counts)
    for e in range(num_experts):
        seg = index.idx[index.offs[e] : index.offs[e + 1]]
        assert bool((flat[seg] == e).all()), f"segment {e} holds pairs of another expert"
        assert bool((seg.diff() > 0).all()), "segments keep token order (stable sort)"
    assert bool((flat[index.idx[int(index.offs[-1]) :]] >= num_experts).all()), "sentinels go after the last segment"
    assert torch.equal(index.active_experts(), torch.nonzero(index.counts).flatten())


def test_build_expert_index_rejects_negative_ids():
    # a negative id used to sort before expert 0 and drop its pair without a word
    with pytest.raises(RuntimeError, match="negative expert id"):
        build_expert_index(torch.tensor([[0, 1], [-1, 2]]), 4)


def test_build_expert_index_rejects_1d():
    with pytest.raises(ValueError):
        build_expert_index(torch.zeros(4, dtype=torch.int64), 4)


# ---------------------------------------------------------------- raw operators
OP_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    "gather_div,scatter", [(None, False), (None, True), (1, False), (2, False), (2, True)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("with_bias,with_scale", [(False, False), (True, True)], ids=["plain", "bias+scale"])
def test_esmm(dtype, pattern, gather_div, scatter, with_bias, with_scale):
    gen = torch.Generator().manual_seed(1)
    k, T, K, N = 2, 11, 8, 16
    top = make_routing(T, k, E, pattern, gen)
    index = build_expert_index(top, E)
    rows = {None: T * k, 1: T * k, 2: T}[gather_div]
    x = rand(rows, K, dtype=dtype, gen=gen)
    w = rand(E, K, N, dtype=dtype, gen=gen)
    bias = rand(E, N, dtype=dtype, gen=gen) if with_bias else None
    scale = torch.rand(T * k, generator=gen, dtype=torch.float64).to(dtype) if with_scale else None
    y = torch_ops.esmm(x, w, index.idx, index.offs, gather_div=gather_div, scatter=scatter, bias=bias, row_scale=scale)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = ref_esmm(d(x), d(w), top, index.idx, gather_div=gather_div, scatter=scatter, bias=d(bias), row_scale=d(scale))
    assert y.shape == (T * k, N) and y.dtype == dtype
    assert_close(y, ref, dtype, "esmm")


def test_esmm_strided_weight():
    """``w`` given as a transposed view (transformers' ``[E, out, in]`` storage) is read correctly."""
    gen = torch.Generator().manual_seed(2)
    top = make_routing(9, 2, E, "skewed", gen)
    index = build_expert_index(top, E)
    x = rand(9, 8, dtype=torch.float32, gen=gen)
    w_store = rand(E, 16, 8, dtype=torch.float32, gen=gen)
    y = torch_ops.esmm(x, w_store.transpose(1, 2), index.idx, index.offs, gather_div=2)
    ref = ref_esmm(x.double(), w_store.transpose(1, 2).double(), top, index.idx, gather_div=2)
    assert_close(y, ref, torch.float32, "esmm strided")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("K,N", [(6, 5), (3, 7)])
def test_operators_unaligned_dims(dtype, K, N):
    """Row sizes that are not a multiple of 16 bytes (tiny test models have them) still compute."""
    gen = torch.Generator().manual_seed(3)
    top = make_routing(7, 2, E, "skewed", gen)
    index = build_expert_index(top, E)
    x = rand(7, K, dtype=dtype, gen=gen)
    w = rand(E, K, N, dtype=dtype, gen=gen)
    dy = rand(14, N, dtype=dtype, gen=gen)
    y = torch_ops.esmm(x, w, index.idx, index.offs, gather_div=2)
    assert_close(y, ref_esmm(x.double(), w.double(), top, index.idx, gather_div=2), dtype, "esmm")
    dw = torch_ops.estmm(x, dy, index.idx, index.offs, x_div=2, dy_div=1)
    assert_close(dw, ref_estmm(x.double(), dy.double(), top, index.idx, E, x_div=2, dy_div=1), dtype, "estmm")


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("x_div,dy_div", [(None, None), (2, 1), (2, None), (None, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_scale", [False, True], ids=["noscale", "scale"])
def test_estmm_and_ess(dtype, pattern, x_div, dy_div, with_scale):
    gen = torch.Generator().manual_seed(4)
    k, T, K, N = 2, 23, 8, 16  # 'one_expert' gives a 46-row segment: longer than a 16-row tile
    top = make_routing(T, k, E, pattern, gen)
    index = build_expert_index(top, E)
    nrows = lambda div: {None: T * k, 1: T * k, 2: T}[div]  # noqa: E731
    x = rand(nrows(x_div), K, dtype=dtype, gen=gen)
    dy = rand(nrows(dy_div), N, dtype=dtype, gen=gen)
    scale = torch.rand(T * k, generator=gen, dtype=torch.float64).to(dtype) if with_scale else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    dw = torch_ops.estmm(x, dy, index.idx, index.offs, x_div=x_div, dy_div=dy_div, dy_scale=scale)
    assert dw.shape == (E, K, N)
    ref = ref_estmm(d(x), d(dy), top, index.idx, E, x_div=x_div, dy_div=dy_div, dy_scale=d(scale))
    assert_close(dw, ref, dtype, "estmm")
    for e in range(E):
        if int(index.counts[e]) == 0:
            assert bool((dw[e] == 0).all()), f"empty expert {e} must get an exact zero gradient"
    db = torch_ops.ess(dy, index.idx, index.offs, dy_div=dy_div, dy_scale=scale)
    assert db.shape == (E, N) and db.dtype == dtype
    assert_close(db, ref_ess(d(dy), top, index.idx, E, dy_div=dy_div, dy_scale=d(scale)), dtype, "ess")


# ---------------------------------------------------------------- expert_linear
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    "gather_div,scatter", [(None, False), (2, False), (2, True), (1, True)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("with_bias,with_scale", [(False, False), (True, False), (True, True)], ids=["plain", "bias", "bias+scale"])
def test_expert_linear_forward_backward(dtype, pattern, gather_div, scatter, with_bias, with_scale):
    gen = torch.Generator().manual_seed(5)
    k, T, K, N = 2, 19, 8, 16
    top = make_routing(T, k, E, pattern, gen)
    index = build_expert_index(top, E)
    rows = {None: T * k, 1: T * k, 2: T}[gather_div]
    x = rand(rows, K, dtype=dtype, gen=gen, requires_grad=True)
    w = rand(E, K, N, dtype=dtype, gen=gen, requires_grad=True)
    bias = rand(E, N, dtype=dtype, gen=gen, requires_grad=True) if with_bias else None
    scale = torch.rand(T * k, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if with_scale else None
    y = expert_linear(x, w, index, gather_div=gather_div, scatter=scatter, bias=bias, row_scale=scale)
    dy = rand(*y.shape, dtype=dtype, gen=gen)
    y.backward(dy)

    leaves = {"x": x, "w": w, "bias": bias, "row_scale": scale}
    refs = {n: None if t is None else fp64_leaf(t) for n, t in leaves.items()}
    ref = ref_esmm(refs["x"], refs["w"], top, index.idx, gather_div=gather_div, scatter=scatter,
                   bias=refs["bias"], row_scale=refs["row_scale"])
    ref.backward(dy.double())
    assert_close(y, ref, dtype, "forward")
    for name, got in leaves.items():
        if got is None:
            continue
        want = refs[name]
        assert got.grad is not None, name
        assert got.grad.dtype == got.dtype, name
        assert_close(got.grad, want.grad, dtype, name)


def test_expert_linear_scale_without_grad():
    """Fixed routing weights (no grad) take the fused scaled-ESMM input-gradient path."""
    gen = torch.Generator().manual_seed(6)
    k, T = 3, 9
    top = make_routing(T, k, E, "sentinel", gen)
    index = build_expert_index(top, E)
    x = rand(T, 8, dtype=torch.float64, gen=gen, requires_grad=True)
    w = rand(E, 8, 8, dtype=torch.float64, gen=gen, requires_grad=True)
    scale = torch.rand(T * k, generator=gen, dtype=torch.float64)
    expert_linear(x, w, index, gather_div=k, scatter=True, row_scale=scale).backward(torch.ones(T * k, 8, dtype=torch.float64))
    rx, rw = fp64_leaf(x), fp64_leaf(w)
    ref_esmm(rx, rw, top, index.idx, gather_div=k, scatter=True, row_scale=scale).sum().backward()
    assert_close(x.grad, rx.grad, torch.float64, "dx")
    assert_close(w.grad, rw.grad, torch.float64, "dw")


# ---------------------------------------------------------------- expert_mlp
MLP_VARIANTS = {  # name -> (act, gated, interleaved, bias)
    "swiglu": ("silu", True, False, False),
    "swiglu_interleaved_bias": ("silu", True, True, True),
    "geglu_tanh": ("gelu_pytorch_tanh", True, False, False),
    "gelu_bias": ("gelu", False, False, True),
    "relu": ("relu", False, False, False),
}


def run_mlp_case(dtype, pattern, k, variant, num_experts=E, T=10, d=8, f=8, seed=7):
    act, gated, inter, with_bias = MLP_VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    top = make_routing(T, k, num_experts, pattern, gen)
    index = build_expert_index(top, num_experts)
    f1 = 2 * f if gated else f
    x = rand(T, d, dtype=dtype, gen=gen, requires_grad=True)
    w1 = (rand(num_experts, d, f1, dtype=dtype, gen=gen) * 0.5).requires_grad_()
    w2 = (rand(num_experts, f, d, dtype=dtype, gen=gen) * 0.5).requires_grad_()
    b1 = rand(num_experts, f1, dtype=dtype, gen=gen, requires_grad=True) if with_bias else None
    b2 = rand(num_experts, d, dtype=dtype, gen=gen, requires_grad=True) if with_bias else None
    scale = torch.softmax(torch.randn(T, k, generator=gen, dtype=torch.float64), -1).reshape(-1).to(dtype).requires_grad_()
    out = expert_mlp(x, w1, w2, index, act=act, gated=gated, interleaved=inter, b1=b1, b2=b2, row_scale=scale)
    dout = rand(T, d, dtype=dtype, gen=gen)
    out.backward(dout)
    leaves = {"x": x, "w1": w1, "w2": w2, "b1": b1, "b2": b2, "row_scale": scale}
    ref_leaves = {n: (None if t is None else fp64_leaf(t)) for n, t in leaves.items()}
    ref = ref_moe(
        ref_leaves["x"], ref_leaves["w1"], ref_leaves["w2"], top, act=act, gated=gated, interleaved=inter,
        b1=ref_leaves["b1"], b2=ref_leaves["b2"], row_scale=ref_leaves["row_scale"],
    )
    ref.backward(dout.double())
    assert out.shape == (T, d) and out.dtype == dtype
    assert_close(out, ref, dtype, f"{variant} forward")
    for n, t in leaves.items():
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == dtype, n
        assert_close(t.grad, ref_leaves[n].grad, dtype, f"{variant} d{n}")
    return index


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("variant", list(MLP_VARIANTS))
def test_expert_mlp_variants(dtype, pattern, variant):
    run_mlp_case(dtype, pattern, 2, variant)


@pytest.mark.parametrize("k", range(1, 9))
def test_expert_mlp_top_k(k):
    for pattern in ("uniform", "sentinel"):
        run_mlp_case(torch.float32, pattern, k, "swiglu", num_experts=9, T=6)


def test_expert_mlp_long_segments():
    """Segments far longer than a 16-row tile (the HEXA-MoE ESS/ESTMM double-count bug)."""
    index = run_mlp_case(torch.float32, "skewed", 2, "swiglu_interleaved_bias", T=70)
    assert int(index.counts.max()) > 33
    run_mlp_case(torch.float32, "one_expert", 1, "gelu_bias", T=50)


def test_expert_mlp_empty_expert_gets_zero_grad():
    gen = torch.Generator().manual_seed(8)
    top = make_routing(12, 2, E, "skewed", gen)  # expert 3 never chosen
    index = build_expert_index(top, E)
    assert int(index.counts[3]) == 0
    x = torch.randn(12, 8, generator=gen, requires_grad=True)
    w1 = torch.randn(E, 8, 8, generator=gen, requires_grad=True)
    w2 = torch.randn(E, 8, 8, generator=gen, requires_grad=True)
    b1 = torch.randn(E, 8, generator=gen, requires_grad=True)
    b2 = torch.randn(E, 8, generator=gen, requires_grad=True)
    s = torch.rand(24, generator=gen)
    expert_mlp(x, w1, w2, index, act="relu", gated=False, b1=b1, b2=b2, row_scale=s).sum().backward()
    for g in (w1.grad[3], w2.grad[3], b1.grad[3], b2.grad[3]):
        assert bool((g == 0).all())
    assert bool((w2.grad[0] != 0).any())


def test_expert_mlp_all_sentinels():
    """A rank that owns none of the chosen experts returns zeros and zero gradients, not garbage."""
    top = torch.full((5, 2), E + 1, dtype=torch.int64)
    index = build_expert_index(top, E)
    x = torch.randn(5, 8, requires_grad=True)
    w1 = torch.randn(E, 8, 16, requires_grad=True)
    w2 = torch.randn(E, 8, 8, requires_grad=True)
    s = torch.rand(10, requires_grad=True)
    out = expert_mlp(x, w1, w2, index, row_scale=s)
    out.sum().backward()
    assert bool((out == 0).all())
    for g in (x.grad, w1.grad, w2.grad, s.grad):
        assert g is not None and bool((g == 0).all())


# ---------------------------------------------------------------- gradcheck (fp64)
@pytest.mark.parametrize("pattern", ["skewed", "sentinel"])
@pytest.mark.parametrize("gather_div,scatter", [(2, True), (None, False)], ids=lambda v: str(v))
def test_gradcheck_expert_linear(pattern, gather_div, scatter):
    gen = torch.Generator().manual_seed(9)
    k, T = 2, 6
    top = make_routing(T, k, 4, pattern, gen)
    index = build_expert_index(top, 4)
    rows = T if gather_div == 2 else T * k
    x = torch.randn(rows, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.rand(T * k, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b, s: expert_linear(x, w, index, gather_div=gather_div, scatter=scatter, bias=b, row_scale=s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, s), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["swiglu_interleaved_bias", "geglu_tanh", "gelu_bias"])
def test_gradcheck_expert_mlp(variant):
    act, gated, inter, with_bias = MLP_VARIANTS[variant]
    gen = torch.Generator().manual_seed(10)
    k, T, d, f = 2, 5, 3, 4
    top = make_routing(T, k, 4, "sentinel", gen)
    index = build_expert_index(top, 4)
    f1 = 2 * f if gated else f
    g = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    args = [g(T, d), g(4, d, f1), g(4, f, d), g(4, f1) if with_bias else None, g(4, d) if with_bias else None,
            torch.rand(T * k, generator=gen, dtype=torch.float64, requires_grad=True)]
    fn = lambda x, w1, w2, b1, b2, s: expert_mlp(  # noqa: E731
        x, w1, w2, index, act=act, gated=gated, interleaved=inter, b1=b1, b2=b2, row_scale=s)
    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-7)

"""``experts_implementation="hexamoe"`` on transformers' FP8-quantized experts (``FP8Experts``).

On CPU the module is rejected before any work, with a message naming the alternatives. The CUDA path
(block-scaled FP8 weights dequantized to bf16, then the expert-specific operators) is checked here on
CPU with the device gate opened, against a float64 per-token loop over the same dequantized weights.
"""
from __future__ import annotations

import unittest.mock as mock

import pytest
import torch

import ds_hexamoe  # noqa: F401  (registers "hexamoe")
from ds_hexamoe.experts import fp8

f8 = pytest.importorskip("transformers.integrations.finegrained_fp8")


def _fp8_experts(E=4, d=32, f=48, block=(16, 16), seed=0):
    from transformers import MixtralConfig
    from transformers.integrations.moe import use_experts_implementation

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=2)
    cfg._experts_implementation = "hexamoe"
    cls = use_experts_implementation(experts_class=f8.FP8Experts, experts_interface=f8.ALL_FP8_EXPERTS_FUNCTIONS,
                                     has_bias=False, has_gate=True)
    m = cls(config=cfg, block_size=block, activation_scheme="dynamic", has_bias=False, has_gate=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(m, name)
            w.copy_((torch.randn(w.shape, generator=g) * 2).to(w.dtype))
            s = getattr(m, f"{name}_scale_inv")
            s.copy_(torch.rand(s.shape, generator=g) * 0.1 + 0.01)
    return m


def _inputs(T=10, d=32, E=4, k=2):
    g = torch.Generator().manual_seed(1)
    top = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return torch.randn(T, d, generator=g), top, torch.rand(T, k, generator=g)


def test_hexamoe_is_registered_for_fp8_experts():
    assert "hexamoe" in f8.ALL_FP8_EXPERTS_FUNCTIONS


def test_fp8_on_cpu_is_rejected_before_work():
    m = _fp8_experts()
    x, top, w = _inputs()
    with mock.patch.object(fp8, "build_expert_index", side_effect=AssertionError("work started")):
        with pytest.raises(ValueError, match=r"FP8-quantized experts module \(FP8Experts\) on cpu.*grouped_mm"):
            m(x, top, w)


def test_dequantize_block_scales():
    w = torch.randn(2, 5, 7).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, 4) + 0.5  # blocks of 2 x 2, ragged at the edges
    ref = w.float().clone()
    for e in range(2):
        for i in range(5):
            for j in range(7):
                ref[e, i, j] *= s[e, i // 2, j // 2]
    torch.testing.assert_close(fp8.dequantize(w, s, torch.float32), ref)


def test_fp8_path_matches_loop_on_dequantized_weights():
    m = _fp8_experts()
    x, top, w = _inputs()
    w1 = fp8.dequantize(m.gate_up_proj, m.gate_up_proj_scale_inv, torch.bfloat16).double()
    w2 = fp8.dequantize(m.down_proj, m.down_proj_scale_inv, torch.bfloat16).double()
    xb = x.to(torch.bfloat16).double()
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.size(0)):
        for j in range(top.size(1)):
            e = int(top[t, j])
            g, u = (w1[e] @ xb[t]).chunk(2)
            ref[t] += float(w[t, j].to(torch.bfloat16)) * (w2[e] @ (torch.nn.functional.silu(g) * u))
    xi = x.clone().requires_grad_()
    with mock.patch.object(fp8, "fp8_supported", return_value=True):
        y = m(xi, top, w)
    y.sum().backward()
    assert y.dtype == x.dtype and xi.grad is not None and torch.isfinite(xi.grad).all()
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2

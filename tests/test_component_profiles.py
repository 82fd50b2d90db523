"""Component profiles: attention-kernel and expert speeds per device (table, declared, measured), the
sequence-length effect in the cost model, and the slowdown clock's separate attention/expert factors."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.config import ConfigError
from ds_hexamoe.experts.stats import synthetic_stats
from ds_hexamoe.hetero import slowdown as SD
from ds_hexamoe.parallel import common as C
from ds_hexamoe.placement.costs import CostModel, PlanOptions
from ds_hexamoe.placement.profiles import load_profiles
from ds_hexamoe.placement.shapes import MODEL_SHAPES, ModelShape


def test_table_has_the_hetermoe_asymmetry():
    a40, v100, a100, h100 = load_profiles(["A40", "V100", "A100", "H100"])
    assert a40.sdpa_flops / v100.sdpa_flops == pytest.approx(3.7, rel=0.01)  # long-sequence attention
    assert v100.expert_flops / a40.expert_flops == pytest.approx(0.83, rel=0.01)  # expert GEMMs
    assert h100.sdpa_tflops > a100.sdpa_tflops > a40.sdpa_tflops > v100.sdpa_tflops
    # declared speeds win over the table, and a declared attention speed without a kernel figure uses it
    d = load_profiles([{"name": "V100", "attn_tflops": 50}, {"name": "V100", "sdpa_tflops": 20, "expert_slowdown": 2}])
    assert d[0].sdpa_flops == 50e12 and d[1].sdpa_flops == 20e12
    assert d[1].expert_flops == pytest.approx(125e12 / 2) and d[1].attn_flops == 125e12


@pytest.mark.parametrize("field,value", [("sdpa_tflops", 0), ("sdpa_tflops", "fast"), ("expert_slowdown", 0.5)])
def test_bad_component_fields_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"devices\[1\]\.{field}: got"):
        load_profiles(["A40", {"name": "V100", field: value}])


def test_attention_gap_grows_with_sequence_length():
    """V100/A40 dense time per token: the attention kernel's share grows with seq_len, so the V100's
    disadvantage does too (3.7x on the kernel, 0.83x on the projections)."""
    ratios = []
    for seq in (512, 4096, 32768):
        shape = ModelShape(**{**MODEL_SHAPES["mixtral-8x7b"].to_dict(), "seq_len": seq})
        cost = CostModel(load_profiles(["A40", "V100"]), synthetic_stats(32, 8, 100, 2), shape, 2,
                         PlanOptions(memory_limits_gb=[1e6, 1e6]))
        per_token = cost.dense_per_sample / seq
        ratios.append(per_token[1] / per_token[0])
    assert 1.0 < ratios[0] < ratios[1] < ratios[2] < 3.7


class _FakeTime:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def perf_counter(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def test_clock_stretches_attention_and_experts_by_their_own_factors(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(SD, "time", fake)
    clock = SD.CollectiveClock(3.7, 1.25).install()
    try:
        fake.now += 1.0  # attention work
        C._phase(True)
        fake.now += 2.0  # expert work
        C._phase(False)
        fake.now += 0.5  # more attention
        lap = clock.lap()
    finally:
        clock.uninstall()
    assert lap["slept_s"] == pytest.approx(2.7 * 1.5 + 0.25 * 2.0)
    assert lap["busy_s"] == pytest.approx(3.5 + lap["slept_s"])
    assert clock._phase not in C.PHASE_HOOKS
    with pytest.raises(ValueError, match="expert_slowdown: got 0.5"):
        SD.CollectiveClock(2.0, 0.5)


def test_expert_phases_are_announced_in_forward_and_backward():
    from ds_hexamoe.parallel.weights import ExpertSpec, ExpertWeights

    calls = []
    C.PHASE_HOOKS.append(calls.append)
    try:
        torch.manual_seed(0)
        E, d, f = 3, 8, 16
        spec = ExpertSpec(num_experts=E, ffn_dim=f)
        w = ExpertWeights(torch.randn(E, d, 2 * f, requires_grad=True), torch.randn(E, f, d, requires_grad=True))
        x = torch.randn(5, d, requires_grad=True)
        idx = torch.randint(0, E, (5, 2))
        out = C.compute_experts(x, idx, torch.rand(5, 2), w, spec)
        assert calls == [True, False]
        out.sum().backward()
        assert calls == [True, False, True, False]  # expert backward starts at the output, ends at the input
    finally:
        C.PHASE_HOOKS.remove(calls.append)

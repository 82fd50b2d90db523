"""Component profiles: attention-kernel and expert speeds per device (table, declared, measured), the
sequence-length effect in the cost model, and the slowdown clock's separate attention/expert factors."""
from __future__ import annotations

import pytest
import torch

from ds_hexamoe.config import ConfigError
from ds_hexamoe.experts.stats import synthetic_stats
from ds_hexamoe.hetero import slowdown as SD
from ds_hexamoe.parallel import local_experts as C
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


# ------------------------------------------------------------------ "profile": "measure" at the job's shapes
def _job(seq: int, name: str = "tiny") -> ModelShape:
    return ModelShape(**{**MODEL_SHAPES[name].to_dict(), "seq_len": seq})


def test_measure_shapes_are_the_jobs_capped_at_mixtral_sizes():
    from ds_hexamoe.hetero.profiling import _BUDGET, _SDPA_BUDGETS, measure_shape_for, measured_at

    flops, least, elems = _BUDGET["cpu"]
    job = measure_shape_for(_job(1024), micro_tokens=2 * 1024)  # timed as the job runs it
    assert (job.hidden, job.qkv_cols, job.ffn, job.experts, job.heads, job.head_dim) == (64, 192, 128, 8, 4, 16)
    assert (job.seq_len, job.seqs, job.tokens, job.rows) == (1024, 2, 2048, 2048 * 2 // 8)
    assert measured_at(f"cpu [{job.note}]") == {"hidden": 64, "ffn": 128, "experts": 8, "top_k": 2, "heads": 4,
                                                "seq": 1024, "tokens": 2048}
    # a small job: the same layer sizes and sequence, more rows and sequences per call (noted)
    small = measure_shape_for(_job(64), micro_tokens=4 * 64)
    assert (small.hidden, small.qkv_cols, small.ffn, small.experts, small.seq_len) == (64, 192, 128, 8, 64)
    assert 2 * small.tokens * 64 * 192 >= least * 0.99 and 2 * 8 * small.rows * 64 * 128 >= least * 0.99
    assert 2 * small.seqs * 4 * 64 ** 2 * 16 >= least * 0.99
    rec = measured_at(f"cpu [{small.note}]")
    assert (rec["seq"], rec["tokens"], rec["timed_tokens"], rec["timed_seqs"]) == (64, 256, small.tokens, small.seqs)
    for seq in (4096, 32768):
        m = measure_shape_for(_job(seq, "mixtral-8x7b"), micro_tokens=2 * seq)
        rec = measured_at(f"cpu [{m.note}]")
        assert (rec["hidden"], rec["ffn"], rec["experts"], rec["heads"], rec["seq"]) == (4096, 14336, 8, 32, seq)
        # the rate-setting sizes stay: hidden, head dim, 256 GEMM rows, the sequence up to the score matrix's memory
        assert (m.hidden, m.head_dim, m.tokens, m.rows, m.seq_len) == (4096, 128, 256, 256, min(seq, 4096))
        assert 2 * m.tokens * m.hidden * m.qkv_cols <= flops and 2 * m.experts * m.rows * m.hidden * m.ffn <= flops
        assert 2 * m.seqs * m.heads * m.seq_len ** 2 * m.head_dim <= _SDPA_BUDGETS * flops
        assert m.hidden * max(m.qkv_cols, m.experts * m.ffn) <= elems
        assert rec["timed_ffn"] == m.ffn and rec["timed_experts"] == 1 and ("timed_seq" in rec) == (seq > 4096)


def test_measured_profile_records_the_job_shape_and_declared_values_win():
    from ds_hexamoe.config import HexaMoEConfig
    from ds_hexamoe.hetero.profiling import measured_at
    from ds_hexamoe.hetero.resolve import _measure_local

    cfg = HexaMoEConfig.from_dict({"profile": "measure"})
    short, long = (_measure_local(cfg, 0, 1, _job(seq), micro_tokens=2 * seq) for seq in (64, 1024))
    assert measured_at(short.name)["seq"] == 64 and measured_at(short.name)["tokens"] == 128
    assert measured_at(long.name)["seq"] == 1024 and measured_at(long.name)["hidden"] == 64
    assert measured_at(_measure_local(cfg, 0, 1).name) == {}  # no job shape: the function's defaults
    # a declared entry (one for every rank) still wins over what was measured
    cfg = HexaMoEConfig.from_dict({"profile": "measure", "devices": [
        {"name": "cpu", "attn_tflops": 7.0, "sdpa_tflops": 2.0, "slowdown": 2.0, "latency_us": 9.0}]})
    p = _measure_local(cfg, 1, 2, _job(64), micro_tokens=128)
    assert (p.attn_tflops, p.sdpa_tflops, p.slowdown) == (7.0, 2.0, 2.0) and measured_at(p.name)["seq"] == 64
    cfg = HexaMoEConfig.from_dict({"profile": "measure", "devices": [{"name": "V100", "expert_tflops": 3.0}]})
    p = _measure_local(cfg, 0, 1, _job(64), micro_tokens=128)
    assert p.name == "V100" and p.expert_tflops == 3.0

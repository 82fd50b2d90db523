"""``torch.compile(fullgraph=True)`` of transformers MoE models with ``experts_implementation="hexamoe"``.

Tiny Mixtral and Qwen3-MoE models are built from configs, saved with ``save_pretrained`` and loaded
from disk. The compiled forward+backward must have 0 graph breaks (counted by ``torch._dynamo.explain``
and by a counting backend under ``fullgraph=True``), hold the ``hexamoe`` ops, and give the same logits
and parameter gradients as eager mode. ``aot_eager`` traces forward and backward through AOTAutograd
(every fake implementation runs) without spending minutes in Inductor's C++ build on a 2-core machine;
``scripts/bench_layer.py --compile`` times the Inductor build.
"""
from __future__ import annotations

import os
import sys
import unittest.mock as mock

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from ds_hexamoe.ops import build_expert_index, dispatch  # noqa: E402


def _recording_backend(graphs: dict):
    def record(kind):
        def compiler(gm, _example):
            graphs.setdefault(kind, set()).update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm
        return compiler
    return aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))


def _step(model, ids, probe, run=None):
    model.zero_grad(set_to_none=True)
    logits = (model if run is None else run)(input_ids=ids).logits
    (logits * probe).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_fullgraph_compile_matches_eager(model_type, tmp_path):
    cls = hf_tiny.candidate_classes(model_type)[0]
    hf_tiny.build_tiny(cls, str(tmp_path))
    model = hf_tiny.load(cls, str(tmp_path), "hexamoe")
    ids = hf_tiny.input_ids(model)
    probe = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    logits_eager, grads_eager = _step(model, ids, probe)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda i: model(input_ids=i).logits)(ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1

    torch._dynamo.reset()
    graphs: dict = {}
    counted = torch._dynamo.testing.CompileCounterWithBackend(_recording_backend(graphs))
    compiled = torch.compile(model, backend=counted, fullgraph=True)
    logits_c, grads_c = _step(model, ids, probe, compiled)
    _step(model, ids, probe, compiled)  # a second step reuses the graph: no recompile on the same shapes
    assert counted.frame_count == 1
    assert "hexamoe.expert_mlp.default" in graphs["fw"]
    assert "hexamoe.expert_mlp_backward.default" in graphs["bw"]
    assert hf_tiny.rel_diff(logits_c, logits_eager) <= hf_tiny.REL_TOL
    assert grads_c.keys() == grads_eager.keys()
    experts_grads = [n for n in grads_eager if "experts" in n]
    assert experts_grads, sorted(grads_eager)
    for n in grads_eager:
        assert hf_tiny.rel_diff(grads_c[n], grads_eager[n]) <= hf_tiny.REL_TOL, n


def test_expert_index_has_static_shapes():
    """The routing index traces whole: no data-dependent shape (bincount) and no host sync."""
    def build(top):
        index = build_expert_index(top, 6)
        return index.idx, index.offs, index.counts

    torch._dynamo.reset()
    counted = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(build, backend=counted, fullgraph=True)
    top = torch.tensor([[0, 3], [3, 6], [5, 0], [3, 1]])  # 6 = expert-parallel sentinel
    idx, offs, counts = compiled(top)
    assert counted.frame_count == 1 and counted.op_count > 0
    assert offs.tolist() == [0, 2, 3, 3, 6, 6, 7]
    assert counts.tolist() == [2, 1, 0, 3, 0, 1]
    assert top.reshape(-1)[idx].tolist() == [0, 0, 1, 3, 3, 3, 5, 6]
    assert idx[:2].tolist() == [0, 5]  # stable: token order inside a segment


def test_backend_is_chosen_once():
    """The backend module is resolved at the first call per device type, not imported per call."""
    dispatch.set_backend(None)
    first = dispatch.get_backend(torch.device("cpu"))
    with mock.patch.object(dispatch.importlib, "import_module", side_effect=AssertionError("import per call")):
        assert dispatch.get_backend(torch.device("cpu")) is first
    dispatch.set_backend("torch")  # re-chooses
    try:
        assert dispatch.get_backend(torch.device("cpu")).__name__ == "ds_hexamoe.ops.torch_ops"
    finally:
        dispatch.set_backend(None)

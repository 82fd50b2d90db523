"""Peak memory of the torch path's expert MLP, counted allocation by allocation (deterministic, not timing).

``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and free; the running sum's
maximum is the step's peak of live tensor bytes. The shape keeps Mixtral's proportions
(``E*d/(T*k) = 2``: the weight gradient is twice the pre-activation ``h``) at a size that runs in a second.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ds_hexamoe.ops import build_expert_index, expert_mlp
from ds_hexamoe.testing import live_peak_bytes

T, D, F, E, K = 256, 128, 256, 8, 2  # P = T*K = 512 pairs


def _leaves(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    # transformers' layout ([E, out, in]), passed to the op as transposed views
    w1 = (torch.randn(E, 2 * F, D, generator=gen) * D**-0.5).requires_grad_()
    w2 = (torch.randn(E, D, F, generator=gen) * F**-0.5).requires_grad_()
    top = torch.randn(T, E, generator=gen).topk(K, -1)
    s = torch.softmax(top.values, -1).reshape(-1).requires_grad_()
    dout = torch.randn(T, D, generator=gen)
    return x, w1, w2, s, build_expert_index(top.indices, E), dout


def _forward(x, w1, w2, s, index):
    return expert_mlp(x, w1.transpose(1, 2), w2.transpose(1, 2), index, row_scale=s)


def test_backward_peak_is_gradients_plus_less_than_half_h():
    """Backward holds its gradients plus temporaries under half of ``h``: ``dh`` reuses ``h``'s buffer, ``dx``'s
    expert-order buffer is freed before ``dw1`` exists and ``dw1``'s token rows are gathered per expert.
    (Before: a second ``[P, 2f]`` buffer for ``dh`` and a ``[P, d]`` gather beside ``dw1``.)"""
    x, w1, w2, s, index, dout = _leaves()
    _forward(x, w1, w2, s, index).backward(dout)  # warm-up: one-time allocations stay out of the count
    for t in (x, w1, w2, s):
        t.grad = None
    y = _forward(x, w1, w2, s, index)
    peak = live_peak_bytes(lambda: y.backward(dout))
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (x, w1, w2, s))
    h_bytes = T * K * 2 * F * 4
    assert peak <= grads + h_bytes // 2, (peak, grads, h_bytes)


def test_inplace_backward_matches_the_retained_graph_backward():
    """The eager backward that writes ``dh`` over ``h`` gives the same gradients as the functional backward
    (``retain_graph=True`` keeps ``h`` intact and may run twice), and actually ran."""
    x, w1, w2, s, index, dout = _leaves(1)
    y = _forward(x, w1, w2, s, index)
    kept = torch.autograd.grad(y, (x, w1, w2, s), dout, retain_graph=True)
    again = torch.autograd.grad(y, (x, w1, w2, s), dout, retain_graph=True)  # h was not overwritten
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        freed = torch.autograd.grad(y, (x, w1, w2, s), dout)
    names = {e.key for e in prof.key_averages()}
    assert "hexamoe::expert_mlp_backward_" in names, sorted(n for n in names if "hexamoe" in n)
    for a, b, c in zip(kept, again, freed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward through the graph a second time|modified by an inplace"):
        torch.autograd.grad(y, (x,), dout)


def test_inplace_backward_op_registration():
    """The mutating op declares its mutation of ``h`` and has a fake implementation (opcheck)."""
    x, w1, w2, s, index, dout = _leaves(2)
    with torch.no_grad():
        _, h = torch.ops.hexamoe.expert_mlp(x, w1.transpose(1, 2), w2.transpose(1, 2), index.idx, index.offs, K,
                                            "silu", True, False, None, None, s)
    args = (dout, x.detach(), h, w1.detach().transpose(1, 2), w2.detach().transpose(1, 2), index.idx, index.offs,
            K, "silu", True, False, None, None, s.detach(), [True, True, True, False, False, True])
    torch.library.opcheck(torch.ops.hexamoe.expert_mlp_backward_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_layer_peak_at_or_below_transformers_grouped_mm():
    """A transformers Mixtral block's forward+backward peaks no higher with ``"hexamoe"`` than with
    ``"grouped_mm"`` (same weights, same routing)."""
    pytest.importorskip("transformers")
    import ds_hexamoe  # noqa: F401  (registers "hexamoe")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    peaks = {}
    for impl in ("hexamoe", "grouped_mm"):
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
        cfg._experts_implementation = impl
        torch.manual_seed(0)
        block = MixtralSparseMoeBlock(cfg).train()
        x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
        dy = torch.randn(1, T, D, generator=torch.Generator().manual_seed(2))

        def step():
            out = block(x.detach().requires_grad_())
            (out[0] if isinstance(out, tuple) else out).backward(dy)

        step()
        block.zero_grad(set_to_none=True)
        peaks[impl] = live_peak_bytes(step)
    assert peaks["hexamoe"] <= peaks["grouped_mm"], peaks

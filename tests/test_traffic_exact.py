"""The simulator's byte count (``placement.traffic.layer_bytes``) equals the runtime's accounting exactly.

Real gloo ranks run one MoE layer call (forward and backward) per mode through the runtime's layer cores
on uneven, skewed routing; each rank's ``CallStats`` bytes (sent and received, every collective) must
equal the count made from the routing alone. Fails if either side's bookkeeping drifts by one byte.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_hexamoe.placement.traffic import layer_bytes, owner_destinations
from ds_hexamoe.testing import run_distributed

E, D, F, K = 6, 8, 24, 2  # f slices stay 16-byte aligned (grouped_mm)
SIZES = {2: [7, 3], 3: [5, 0, 9]}  # uneven, one rank without tokens at 3


def _routing(world: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(SIZES[world])
    x = torch.randn(t, D, generator=g, dtype=dtype)
    logits = torch.randn(t, E, generator=g)
    logits[:, 0] += 2.0  # a hot expert: many tokens share a destination
    w, idx = torch.softmax(logits, -1).topk(K, -1)
    return x, idx, w.to(dtype)


def _placements(world: int) -> dict:
    return {"round_robin": {e: [e % world] for e in range(E)},
            "pairs_together": {e: [(e // 2) % world] for e in range(E)},  # experts 0,1 share a rank
            "all_on_last": {e: [world - 1] for e in range(E)}}


def _worker(rank, world):
    from ds_hexamoe.parallel import ExpertParallelMoE, ExpertSpec, ModelCentricMoE, ReplicatedExperts
    from ds_hexamoe.parallel.accounting import TokenAccounting
    from ds_hexamoe.parallel.data_centric import DataCentricMoE

    spec = ExpertSpec(E, F, act="silu", gated=True)
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(E, D, spec.f1, generator=g) / D**0.5
    w2 = torch.randn(E, F, D, generator=g) / F**0.5
    lo = sum(SIZES[world][:rank])
    rows = slice(lo, lo + SIZES[world][rank])
    acc = TokenAccounting()
    out = {}

    def call(name, moe, *extra):
        x, idx, w = _routing(world, 1)
        x, w = x[rows].clone().requires_grad_(), w[rows].clone().requires_grad_()
        mat = ReplicatedExperts(spec, w1.clone().requires_grad_(), w2.clone().requires_grad_())
        y = moe(x, idx[rows], w, *extra, mat) if extra else moe(x, idx[rows], w, mat)
        y.square().sum().backward()
        c = acc.last()
        out[name] = (c.bytes_sent(), c.bytes_received())

    call("data_centric", DataCentricMoE(spec, accounting=acc))
    call("model_centric", ModelCentricMoE(spec, accounting=acc))
    call("model_centric_uneven_f", ModelCentricMoE(spec, speeds={2: [2, 1], 3: [4, 1, 1]}[world], accounting=acc))
    for pname, placement in _placements(world).items():
        call(f"expert_parallel/{pname}", ExpertParallelMoE(spec, accounting=acc), placement)
    return out


@pytest.fixture(scope="module", params=[2, 3])
def measured(request):
    world = request.param
    return world, run_distributed(_worker, world, timeout=240)


def _expected(world: int, name: str) -> dict:
    _, idx, _ = _routing(world, 1)
    routing = [a.numpy() for a in idx.split(SIZES[world])]
    mode, _, pname = name.partition("/")
    if mode == "expert_parallel":
        return layer_bytes(mode, routing, D, 4, dest=owner_destinations(routing, _placements(world)[pname]))
    return layer_bytes(mode.replace("_uneven_f", ""), routing, D, 4)


def test_bytes_per_rank_equal_runtime_accounting(measured):
    world, res = measured
    for name in res[0]:
        want = _expected(world, name)
        got_sent = [res[r][name][0] for r in range(world)]
        got_recv = [res[r][name][1] for r in range(world)]
        assert got_sent == want["sent"], (world, name, got_sent, want["sent"])
        assert got_recv == want["received"], (world, name, got_recv, want["received"])
        if name != "data_centric":
            assert min(got_sent) > 0


def test_token_sharing_a_rank_is_sent_once():
    """Two pairs of one token on one other rank are one row: fewer bytes than the pair count."""
    routing = [np.array([[0, 1], [0, 1]]), np.zeros((0, 2), dtype=np.int64)]
    dest = owner_destinations(routing, [1, 1, 0])
    b = layer_bytes("expert_parallel", routing, hidden=4, elem_bytes=4, dest=dest)
    # counts 32 + 2 rows x (4k index + (2d + k) s payload out)
    assert b["sent"][0] == 32 + 2 * (4 * 2 + (2 * 4 + 2) * 4)
    assert b["received"][1] == b["sent"][0]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="dest="):
        layer_bytes("expert_parallel", [np.zeros((1, 2))], 4)
    with pytest.raises(ValueError, match="several replicas"):
        owner_destinations([np.zeros((1, 2))], {0: [0, 1]})
    with pytest.raises(ValueError, match="expected one of"):
        layer_bytes("zebra", [np.zeros((1, 2))], 4)

"""Expert-parallel and model-centric modes on real gloo ranks against single-process ``expert_mlp``.

Every distributed result (outputs, gradients of hidden / routing weights / expert weights, and
parameters after several SGD steps) is compared with a plain one-process computation on the
concatenated tokens of all ranks with full weights.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from ds_hexamoe.ops import build_expert_index, expert_mlp
from ds_hexamoe.parallel import (
    ExpertParallelMoE,
    ExpertSpec,
    ModelCentricMoE,
    ParallelMoE,
    ReplicatedExperts,
    split_hidden,
    placement_weights,
    validate_placement,
)
from ds_hexamoe.parallel.local_experts import check_routing
from ds_hexamoe.parallel.replicas import PlacementTables, assign_destinations
from ds_hexamoe.testing import run_distributed

E, D, F, K = 6, 8, 6, 2


@dataclasses.dataclass
class Case:
    spec: ExpertSpec
    sizes: list[int]
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    g: torch.Tensor  # upstream gradient of the output
    w1: torch.Tensor
    w2: torch.Tensor
    b1: torch.Tensor | None
    b2: torch.Tensor | None


def make_case(seed: int, sizes: list[int], gated=True, bias=False, act="silu", interleaved=False, dtype=torch.float64,
              skew=False, f=F) -> Case:
    g = torch.Generator().manual_seed(seed)
    spec = ExpertSpec(E, f, act=act, gated=gated, interleaved=interleaved)
    t = sum(sizes)
    x = torch.randn(t, D, generator=g, dtype=torch.float64)
    logits = torch.randn(t, E, generator=g, dtype=torch.float64)
    if skew:
        logits[:, 0] += 3.0  # most tokens pick expert 0: a hot expert for the replica paths
    w, idx = torch.softmax(logits, -1).topk(K, -1)
    w1 = torch.randn(E, D, spec.f1, generator=g, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, f, D, generator=g, dtype=torch.float64) / f**0.5
    b1 = torch.randn(E, spec.f1, generator=g, dtype=torch.float64) * 0.1 if bias else None
    b2 = torch.randn(E, D, generator=g, dtype=torch.float64) * 0.1 if bias else None
    gout = torch.randn(t, D, generator=g, dtype=torch.float64)
    cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    return Case(spec, sizes, cast(x), idx, cast(w), cast(gout), cast(w1), cast(w2), cast(b1), cast(b2))


def reference(case: Case) -> dict:
    """Single process: ``expert_mlp`` on all tokens with full weights, in float64."""
    leaf = lambda v: None if v is None else v.detach().double().clone().requires_grad_()  # noqa: E731
    x, w, w1, w2, b1, b2 = map(leaf, (case.x, case.w, case.w1, case.w2, case.b1, case.b2))
    s = case.spec
    out = expert_mlp(x, w1, w2, build_expert_index(case.idx, E), act=s.act, gated=s.gated, interleaved=s.interleaved,
                     b1=b1, b2=b2, row_scale=w.reshape(-1))
    (out * case.g.double()).sum().backward()
    res = {"out": out.detach(), "dx": x.grad, "dw": w.grad, "dw1": w1.grad, "dw2": w2.grad}
    if b1 is not None:
        res.update(db1=b1.grad, db2=b2.grad)
    return res


def _rows(case: Case, rank: int) -> slice:
    lo = sum(case.sizes[:rank])
    return slice(lo, lo + case.sizes[rank])


def _rank_case(rank: int, world: int, case: Case, moe, placement=None) -> dict:
    """One call + backward on this rank; expert-weight gradients summed over ranks (the caller's reduce)."""
    rows = _rows(case, rank)
    leaf = lambda v: None if v is None else v.detach().clone().requires_grad_()  # noqa: E731
    w1, w2, b1, b2 = map(leaf, (case.w1, case.w2, case.b1, case.b2))
    x, w = leaf(case.x[rows]), leaf(case.w[rows])
    mat = ReplicatedExperts(case.spec, w1, w2, b1, b2)
    if placement is None:
        out = moe(x, case.idx[rows], w, mat)
    else:
        out = moe(x, case.idx[rows], w, placement, mat)
    (out * case.g[rows]).sum().backward()
    res = {"out": out.detach(), "dx": x.grad, "dw": w.grad}
    names = [("dw1", w1), ("dw2", w2)] + ([("db1", b1), ("db2", b2)] if b1 is not None else [])
    for name, p in names:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        res[name] = grad
    return res


# ----------------------------------------------------------------------------------------------
# one 4-rank spawn runs every equality scenario; the tests below read its results

SIZES4 = [5, 0, 7, 3]  # uneven, one rank without tokens
EP_PLACEMENTS = {
    "round_robin": {e: [e % 4] for e in range(E)},
    "replicas": {0: [0, 1, 2, 3], 1: [2, 1], 2: [3], 3: [0, 2], 4: [1], 5: [3, 0]},
    "all_on_rank3": {e: [3] for e in range(E)},
    # the planner's unequal token fractions (a zero-fraction copy is hosted but sent nothing)
    "fractions": {0: {0: 0.5, 1: 0.3, 2: 0.2}, 1: {2: 0.9, 1: 0.1}, 2: [3], 3: {0: 0.25, 2: 0.75}, 4: [1],
                  5: {3: 1.0, 0: 0.0}},
}
EP_CASES = {
    "gated_silu": dict(seed=1, skew=True),
    "plain_gelu_bias": dict(seed=2, gated=False, bias=True, act="gelu"),
    "gated_interleaved_bias": dict(seed=3, bias=True, interleaved=True, skew=True),
}
MC_SPEEDS = {"equal": [1, 1, 1, 1], "hetero_with_zero": [1.0, 2.5, 0.0, 1.0]}
BF16_SPEEDS = [1, 1, 0, 2]


def _equality_worker(rank, world):
    from ds_hexamoe.parallel.accounting import TokenAccounting

    out = {}
    acc = TokenAccounting()
    for cname, kw in EP_CASES.items():
        case = make_case(sizes=SIZES4, **kw)
        ep = ExpertParallelMoE(case.spec, accounting=acc)
        for pname, placement in EP_PLACEMENTS.items():
            out[("ep", cname, pname)] = _rank_case(rank, world, case, ep, placement)
        mc = ModelCentricMoE(case.spec, accounting=acc)
        for sname, speeds in MC_SPEEDS.items():
            mc.set_speeds(speeds)
            out[("mc", cname, sname)] = _rank_case(rank, world, case, mc)
    # bf16: the half-precision reduce-scatter (all-to-all + fp32 sum) and bf16 dispatch. f=32 and
    # slices [8, 8, 0, 16] keep every operand row 16-byte aligned, which torch._grouped_mm requires
    case = make_case(4, SIZES4, dtype=torch.bfloat16, skew=True, f=32)
    out[("ep", "bf16", "replicas")] = _rank_case(rank, world, case, ExpertParallelMoE(case.spec), EP_PLACEMENTS["replicas"])
    out[("mc", "bf16", "hetero")] = _rank_case(rank, world, case, ModelCentricMoE(case.spec, speeds=BF16_SPEEDS))
    # a placement that differs across ranks must raise on every rank (not hang)
    case = make_case(5, SIZES4)
    bad = {e: [(e + (rank == 1)) % 4] for e in range(E)}
    try:
        _rank_case(rank, world, case, ExpertParallelMoE(case.spec), bad)
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # accounting of one exact EP call: tokens per expert and bytes of each collective
    out["stats"] = [c.to_dict() for c in acc.calls][:1]
    out["summary"] = acc.summary()
    return out


@pytest.fixture(scope="module")
def equality_results():
    return run_distributed(_equality_worker, 4, timeout=240)


def _assert_matches(results, key, case: Case, tol: float):
    ref = reference(case)
    for name, want in ref.items():
        if name in ("out", "dx", "dw"):
            got = torch.cat([results[r][key][name] for r in range(len(results))])
        else:
            got = results[0][key][name]
            for r in range(1, len(results)):  # the reduced gradient is the same on every rank
                assert torch.equal(got, results[r][key][name])
        err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err < tol, f"{key} {name}: relative max error {err:.3g} >= {tol}"


@pytest.mark.parametrize("pname", list(EP_PLACEMENTS))
@pytest.mark.parametrize("cname", list(EP_CASES))
def test_expert_parallel_matches_single_process(equality_results, cname, pname):
    _assert_matches(equality_results, ("ep", cname, pname), make_case(sizes=SIZES4, **EP_CASES[cname]), 1e-12)


@pytest.mark.parametrize("sname", list(MC_SPEEDS))
@pytest.mark.parametrize("cname", list(EP_CASES))
def test_model_centric_matches_single_process(equality_results, cname, sname):
    _assert_matches(equality_results, ("mc", cname, sname), make_case(sizes=SIZES4, **EP_CASES[cname]), 1e-12)


def test_bf16_paths_close_to_fp64_reference(equality_results):
    case = make_case(4, SIZES4, dtype=torch.bfloat16, skew=True, f=32)
    _assert_matches(equality_results, ("ep", "bf16", "replicas"), case, 3e-2)
    _assert_matches(equality_results, ("mc", "bf16", "hetero"), case, 3e-2)


def test_placement_mismatch_raises_on_every_rank(equality_results):
    for r in range(4):
        msg = equality_results[r]["mismatch"]
        assert msg is not None and "differ across ranks" in msg


def test_accounting_counts_tokens_and_bytes(equality_results):
    case = make_case(sizes=SIZES4, **EP_CASES["gated_silu"])
    for r in range(4):
        st = equality_results[r]["stats"][0]  # first call: ep, gated_silu, round_robin
        rows = _rows(case, r)
        assert st["mode"] == "expert_parallel" and st["dropped_tokens"] == 0
        assert st["tokens_per_expert"] == torch.bincount(case.idx[rows].reshape(-1), minlength=E).tolist()
        by = {(c["name"], c["phase"]): c for c in st["collectives"]}
        assert set(by) >= {("dispatch", "forward"), ("combine", "forward"), ("dispatch", "backward"), ("combine", "backward")}
        # tokens leaving this rank: one row per (token, remote destination) with d + k floats (fp64)
        dest = case.idx[rows] % 4  # round-robin placement: expert e on rank e % 4
        n_remote = sum(len(set(d.tolist()) - {r}) for d in dest)
        assert by[("dispatch", "forward")]["bytes_sent"] == n_remote * (D + K) * 8
        assert by[("combine", "forward")]["bytes_received"] == n_remote * D * 8
        assert by[("combine", "backward")]["bytes_sent"] == n_remote * D * 8
        assert by[("dispatch", "backward")]["bytes_sent"] == by[("dispatch", "forward")]["bytes_received"]
    assert equality_results[0]["summary"]["dropped_tokens"] == 0


# ----------------------------------------------------------------------------------------------
# training: a few SGD steps of input projection + router + experts, distributed vs one process

STEPS = 4
TRAIN_SIZES = [[4, 6, 2], [7, 0, 5], [3, 3, 6], [1, 8, 3]]  # tokens per rank, per step (uneven, varying)
TRAIN_PLACEMENTS = [  # a different placement every step, replicas included
    {e: [e % 3] for e in range(E)},
    {0: [0, 1, 2], 1: [1], 2: [2, 0], 3: [0], 4: [1, 2], 5: [2]},
    {e: [1] for e in range(E)},
    {e: [0, 1, 2] for e in range(E)},
]
TRAIN_SPEEDS = [[1, 1, 1], [1, 3, 2], [1, 3, 2], [0, 1, 4]]  # re-split f between steps
LR = 0.02


def _init_params():
    g = torch.Generator().manual_seed(7)
    return {
        "win": torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5,
        "wr": torch.randn(D, E, generator=g, dtype=torch.float64),
        "w1": torch.randn(E, D, 2 * F, generator=g, dtype=torch.float64) / D**0.5,
        "w2": torch.randn(E, F, D, generator=g, dtype=torch.float64) / F**0.5,
    }


def _step_data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    n = sum(TRAIN_SIZES[step])
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)


def _forward(p, x, moe_call):
    h = x @ p["win"]
    w, idx = torch.softmax(h @ p["wr"], -1).topk(K, -1)
    w = w / w.sum(-1, keepdim=True)
    return moe_call(h, idx, w)


def _train(rank: int, world: int, mode: str):
    spec = ExpertSpec(E, F)
    p = {k: v.clone().requires_grad_() for k, v in _init_params().items()}
    losses = []
    moe = ParallelMoE(spec, mode) if world > 1 else None
    for step in range(STEPS):
        x, y = _step_data(step)
        n = x.size(0)
        if world > 1:
            lo = sum(TRAIN_SIZES[step][:rank])
            rows = slice(lo, lo + TRAIN_SIZES[step][rank])
            x, y = x[rows], y[rows]
            if mode == "model_centric":
                moe.impl.set_speeds(TRAIN_SPEEDS[step])
            mat = ReplicatedExperts(spec, p["w1"], p["w2"])
            call = lambda h, i, w: moe(h, i, w, mat, placement=TRAIN_PLACEMENTS[step])  # noqa: E731
        else:
            call = lambda h, i, w: expert_mlp(h, p["w1"], p["w2"], build_expert_index(i, E), row_scale=w.reshape(-1))  # noqa: E731
        loss = ((_forward(p, x, call) - y) ** 2).sum() / n  # local share of the global mean
        loss.backward()
        with torch.no_grad():
            for v in p.values():
                grad = v.grad if v.grad is not None else torch.zeros_like(v)
                if world > 1:
                    dist.all_reduce(grad)
                v -= LR * grad
                v.grad = None
        losses.append(loss.item())
    return {k: v.detach() for k, v in p.items()}, losses


def _train_worker(rank, world):
    return {mode: _train(rank, world, mode) for mode in ("expert_parallel", "model_centric")}


def test_sgd_training_matches_single_process():
    ref_params, ref_losses = _train(0, 1, "single")
    results = run_distributed(_train_worker, 3, timeout=180)
    for mode in ("expert_parallel", "model_centric"):
        for r in range(3):
            params, _ = results[r][mode]
            for name, want in ref_params.items():
                err = (params[name] - want).abs().max().item()
                assert err < 1e-12, f"{mode} rank {r} {name}: max error {err:.3g} after {STEPS} steps"
        summed = [sum(results[r][mode][1][s] for r in range(3)) for s in range(STEPS)]
        assert max(abs(a - b) for a, b in zip(summed, ref_losses)) < 1e-12
    # the parameters moved: a test that cannot fail is no test
    assert (ref_params["w1"] - _init_params()["w1"]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# single-process checks: errors raised before any work, splitting, replica choice


def test_validate_placement_errors_name_the_field():
    with pytest.raises(ValueError, match=r"experts \[5\] have no rank"):
        validate_placement({e: [0] for e in range(5)}, 6, 2)
    with pytest.raises(ValueError, match=r"placement\[1\]: ranks \[2\] are out of range"):
        validate_placement({0: [0], 1: [2]}, 2, 2)
    with pytest.raises(ValueError, match=r"placement\[0\]: got \[\]"):
        validate_placement({0: [], 1: [1]}, 2, 2)
    with pytest.raises(ValueError, match="repeated rank"):
        validate_placement({0: [1, 1], 1: [0]}, 2, 2)
    with pytest.raises(ValueError, match=r"keys \[7\]"):
        validate_placement({0: [0], 1: [0], 7: [0]}, 2, 2)
    assert validate_placement({1: [1, 0], 0: [0]}, 2, 2) == ((0,), (1, 0))


def test_check_routing_errors():
    x, idx, w = torch.randn(3, D), torch.zeros(3, K, dtype=torch.long), torch.rand(3, K)
    with pytest.raises(ValueError, match=r"hidden: got shape"):
        check_routing(x[None], idx, w, E)
    with pytest.raises(ValueError, match=r"top_k_index: ids span \[0, 6\]"):
        check_routing(x, idx + torch.tensor([[0, 6]]), w, E)
    with pytest.raises(ValueError, match=r"top_k_weights"):
        check_routing(x, idx, w[:, :1], E)
    with pytest.raises(ValueError, match=r"top_k_index: got dtype"):
        check_routing(x, idx.float(), w, E)
    with pytest.raises(ValueError, match="ffn_dim"):
        ExpertSpec(E, 0)
    with pytest.raises(ValueError, match="closed-form"):
        ExpertSpec(E, F, act="tanh")


def test_split_hidden():
    assert split_hidden(10, [1, 1]) == [5, 5]
    assert split_hidden(10, [1, 2, 0.5]) == [3, 6, 1]
    assert split_hidden(7, [1, 0, 1]) == [4, 0, 3]
    for speeds in ([3, 1, 4, 1, 5], [0.1, 0.2, 0.7]):
        assert sum(split_hidden(97, speeds)) == 97
    with pytest.raises(ValueError, match="speeds"):
        split_hidden(8, [0, 0])


def test_replica_choice_follows_hecate_rule():
    key = validate_placement({0: [0, 1, 2, 3], 1: [2, 3], 2: [1], 3: [0, 2]}, 4, 4)
    tables = PlacementTables.build(key, 4)
    idx = torch.tensor([[0, 1]] * 8 + [[2, 3]] * 4)  # 8 pairs each for experts 0 and 1, 4 each for 2 and 3
    index = build_expert_index(idx, 4)
    flat = idx.reshape(-1)
    dest = assign_destinations(flat, index.idx, index.offs, tables, rank=0, ranks_per_node=2).view(-1, 2)
    assert (dest[:8, 0] == 0).all()  # expert 0 has a local replica on rank 0
    assert (dest[8:, 1] == 0).all()  # expert 3 too
    assert (dest[8:, 0] == 1).all()  # expert 2: its one replica
    # expert 1 lives on ranks 2 and 3 (another node for ranks_per_node=2): split evenly
    assert torch.bincount(dest[:8, 1], minlength=4).tolist() == [0, 0, 4, 4]
    # same node preferred: rank 1 (node 0) sends expert 3 to rank 0 only, not to rank 2 (node 1)
    dest1 = assign_destinations(flat, index.idx, index.offs, tables, rank=1, ranks_per_node=2).view(-1, 2)
    assert (dest1[8:, 1] == 0).all()
    # one node: rank 1 splits expert 3 between ranks 0 and 2
    dest1 = assign_destinations(flat, index.idx, index.offs, tables, rank=1, ranks_per_node=4).view(-1, 2)
    assert torch.bincount(dest1[8:, 1], minlength=4).tolist() == [2, 0, 2, 0]


def test_replica_choice_follows_token_fractions():
    """Experts given fractions: every source rank splits its pairs by them (local copies or not), within
    one pair per replica; experts given a plain list keep Hecate's rule."""
    placement = {0: {0: 0.75, 1: 0.25}, 1: [2, 3], 2: {1: 0.5, 3: 0.5}, 3: [0, 2]}
    key = validate_placement(placement, 4, 4)
    assert key == ((0, 1), (2, 3), (1, 3), (0, 2))
    weights = placement_weights(placement, key)
    assert weights == ((0.75, 0.25), None, (0.5, 0.5), None)
    tables = PlacementTables.build(key, 4, weights)
    idx = torch.tensor([[0, 1]] * 40 + [[2, 3]] * 10)
    index = build_expert_index(idx, 4)
    flat = idx.reshape(-1)
    for rank in range(4):
        dest = assign_destinations(flat, index.idx, index.offs, tables, rank=rank, ranks_per_node=4).view(-1, 2)
        c0 = torch.bincount(dest[:40, 0], minlength=4).tolist()
        assert c0[2:] == [0, 0] and abs(c0[0] - 30) <= 1 and sum(c0) == 40, (rank, c0)  # 0.75 / 0.25, even on rank 1
        c2 = torch.bincount(dest[40:, 0], minlength=4).tolist()
        assert c2[0] == c2[2] == 0 and abs(c2[1] - 5) <= 1, (rank, c2)
    # expert 3 (a plain list) still prefers rank 0's local copy
    dest0 = assign_destinations(flat, index.idx, index.offs, tables, rank=0, ranks_per_node=4).view(-1, 2)
    assert (dest0[40:, 1] == 0).all()
    with pytest.raises(ValueError, match=r"placement\[0\]: got fractions"):
        placement_weights({0: {0: -1.0, 1: 0.5}}, ((0, 1),))
    with pytest.raises(ValueError, match=r"placement\[0\]: got fractions"):
        placement_weights({0: {0: 0.0, 1: 0.0}}, ((0, 1),))


def test_mode_errors():
    with pytest.raises(ValueError, match=r"hexamoe.mode"):
        ParallelMoE(ExpertSpec(E, F), "auto")

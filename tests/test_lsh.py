"""Cross-polytope LSH and the LSH-compressed expert-parallel dispatch (LSH-MoE)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ds_hexamoe.config import LSHConfig
from ds_hexamoe.ops import build_expert_index, expert_mlp
from ds_hexamoe.parallel import CrossPolytopeLSH, ExpertSpec, ParallelMoE, ReplicatedExperts, bucket_pairs, centroids
from ds_hexamoe.testing import run_distributed

E, D, F, K = 4, 16, 8, 2


def test_rotations_are_orthogonal_and_seeded():
    for rotations in (1, 2, 3):
        h = CrossPolytopeLSH(D, num_hashes=3, num_rotations=rotations, seed=5)
        for r in h.rotations():
            assert torch.allclose(r.t() @ r, torch.eye(D, dtype=torch.float64), atol=1e-12)
    a, b, c = (CrossPolytopeLSH(D, 2, 2, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.proj, b.proj) and not torch.equal(a.proj, c.proj)
    # d not a power of two: padded rotation, columns still orthonormal
    h = CrossPolytopeLSH(12, 1, 2)
    r = h.rotations()[0]
    assert r.shape == (12, 16) and torch.allclose(r @ r.t(), torch.eye(12, dtype=torch.float64), atol=1e-12)


def test_codes_properties():
    h = CrossPolytopeLSH(D, num_hashes=2, num_rotations=2, seed=0)
    x = torch.randn(50, D, dtype=torch.float64)
    c = h.codes(x)
    assert c.shape == (50, 2) and int(c.min()) >= 0 and int(c.max()) < h.buckets_per_hash
    assert torch.equal(h.codes(3.0 * x), c)  # angular: scale does not change the bucket
    assert torch.equal(h.codes(-x), (c + h.hash_dim) % h.buckets_per_hash)  # antipode: the opposite vertex
    with pytest.raises(ValueError, match=r"expected \[T, 16\]"):
        h.codes(x[:, :8])


def test_near_vectors_collide_more_than_far_ones():
    g = torch.Generator().manual_seed(0)
    h = CrossPolytopeLSH(D, num_hashes=1, num_rotations=3, seed=0)
    x = torch.randn(2000, D, generator=g, dtype=torch.float64)
    near = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    far = torch.randn(x.shape, generator=g, dtype=torch.float64)
    p_near = (h.codes(x) == h.codes(near)).double().mean().item()
    p_far = (h.codes(x) == h.codes(far)).double().mean().item()
    assert p_near > 0.6 and p_far < 0.1, (p_near, p_far)


def test_bucket_pairs_and_centroids():
    rank = 0
    dest = torch.tensor([1, 1, 1, 0, 0, 1, 2])
    slot = torch.tensor([0, 0, 1, 0, 0, 0, 0])
    codes = torch.tensor([[3], [3], [3], [3], [3], [4], [3]])
    b = bucket_pairs(dest, slot, codes, rank)
    # local pairs (dest 0) stay singletons; (1, 0, 3) merges pairs 0 and 1; the rest are alone
    assert b.dest.tolist() == [0, 0, 1, 1, 1, 2]
    assert b.counts.tolist() == [1, 1, 2, 1, 1, 1]
    assert b.remote_pairs == 5 and b.remote_buckets == 4 and b.compression == pytest.approx(0.8)
    assert b.of_pair[0] == b.of_pair[1] and b.of_pair[3] != b.of_pair[4]
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    c = centroids(x, b)
    assert torch.allclose(c[b.of_pair[0]], (x[0] + x[1]) / 2) and torch.equal(c[b.of_pair[3]], x[3])
    c.sum().backward()  # differentiable: each member gets 1 / bucket size
    assert torch.allclose(x.grad[:2], torch.full((2, 3), 0.5, dtype=torch.float64))
    assert bucket_pairs(dest, slot, None, rank).compression == 1.0


# ----------------------------------------------------------------------------------------------
# 2 gloo ranks: clustered tokens, LSH on / off, against single-process expert_mlp

T_RANK, CLUSTERS = 48, 3
PLACEMENT = {0: [0], 1: [1], 2: [1], 3: [0, 1]}


def _data(noise: float):
    g = torch.Generator().manual_seed(11)
    centers = torch.randn(CLUSTERS, D, generator=g, dtype=torch.float64) * 2
    which = torch.randint(0, CLUSTERS, (2 * T_RANK,), generator=g)
    x = centers[which] + noise * torch.randn(2 * T_RANK, D, generator=g, dtype=torch.float64)
    # routing follows the cluster (as a trained router would), weights vary per token
    idx = torch.stack((which % E, (which + 1) % E), 1)
    w = torch.softmax(torch.randn(2 * T_RANK, K, generator=g, dtype=torch.float64), -1)
    w1 = torch.randn(E, D, 2 * F, generator=g, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, F, D, generator=g, dtype=torch.float64) / F**0.5
    return x, idx, w, w1, w2


def _reference(noise: float) -> torch.Tensor:
    x, idx, w, w1, w2 = _data(noise)
    return expert_mlp(x, w1, w2, build_expert_index(idx, E), row_scale=w.reshape(-1))


def _run(rank, noise, lsh: LSHConfig, measure=True):
    x, idx, w, w1, w2 = _data(noise)
    rows = slice(rank * T_RANK, (rank + 1) * T_RANK)
    w1, w2 = w1.requires_grad_(), w2.requires_grad_()
    xr = x[rows].clone().requires_grad_()
    moe = ParallelMoE(ExpertSpec(E, F), "expert_parallel", lsh=lsh, measure_lsh_error=measure)
    out = moe(xr, idx[rows], w[rows], ReplicatedExperts(ExpertSpec(E, F), w1, w2), placement=PLACEMENT)
    out.square().sum().backward()
    dist.all_reduce(w1.grad)
    st = moe.accounting.last()
    return {"out": out.detach(), "compression": st.lsh_compression, "err": st.lsh_rel_error,
            "dw1": w1.grad, "dx": xr.grad, "bytes": st.bytes_sent("forward")}


def _lsh_worker(rank, world):
    on = LSHConfig(enabled=True, num_hashes=2, num_rotations=2, seed=3)
    return {
        "clustered": _run(rank, 0.02, on),
        "clustered_no_residual": _run(rank, 0.02, LSHConfig(enabled=True, num_hashes=2, num_rotations=2, seed=3, residual=False)),
        "duplicates": _run(rank, 0.0, on),
        "spread": _run(rank, 20.0, on),
        "off": _run(rank, 0.02, LSHConfig(enabled=False), measure=False),
    }


@pytest.fixture(scope="module")
def lsh_results():
    return run_distributed(_lsh_worker, 2, timeout=180)


def _cat(results, key, field):
    return torch.cat([results[r][key][field] for r in range(2)])


def test_lsh_off_is_exact(lsh_results):
    assert (_cat(lsh_results, "off", "out") - _reference(0.02).detach()).abs().max() < 1e-12
    assert lsh_results[0]["off"]["compression"] is None


def test_lsh_on_clustered_tokens_compresses_with_bounded_error(lsh_results):
    ref = _reference(0.02).detach()
    out = _cat(lsh_results, "clustered", "out")
    for r in range(2):
        res = lsh_results[r]["clustered"]
        rows = slice(r * T_RANK, (r + 1) * T_RANK)
        own = ((res["out"] - ref[rows]).norm() / ref[rows].norm()).item()
        assert res["err"] == pytest.approx(own, rel=1e-9)  # the reported error is the true error
        print(f"rank {r}: compression {res['compression']:.3f}, relative output error {res['err']:.4f}, "
              f"without residual {lsh_results[r]['clustered_no_residual']['err']:.4f}, forward bytes "
              f"{res['bytes']} vs {lsh_results[r]['off']['bytes']} uncompressed")
        assert res["compression"] <= 0.35  # 3 clusters: few centroids per (rank, expert)
        assert res["err"] < 0.05
        assert res["bytes"] < 0.6 * lsh_results[r]["off"]["bytes"]
    assert not torch.equal(out, ref)  # it is an approximation


def test_lsh_duplicates_are_exact_and_spread_tokens_are_not_compressed(lsh_results):
    ref = _reference(0.0).detach()
    assert (_cat(lsh_results, "duplicates", "out") - ref).abs().max() < 1e-12
    for r in range(2):
        assert lsh_results[r]["duplicates"]["err"] < 1e-12
        assert lsh_results[r]["duplicates"]["compression"] < 0.2
        # unclustered tokens land in distinct buckets: little compression, but never wrong shapes
        assert lsh_results[r]["spread"]["compression"] > 0.8


def test_lsh_gradients_flow(lsh_results):
    exact = lsh_results[0]["off"]["dw1"]
    approx = lsh_results[0]["clustered"]["dw1"]
    assert torch.isfinite(approx).all() and approx.abs().max() > 0
    rel = ((approx - exact).norm() / exact.norm()).item()
    assert rel < 0.2, rel  # an approximate gradient, close on clustered tokens
    assert torch.isfinite(_cat(lsh_results, "clustered", "dx")).all()


def test_lsh_config_errors():
    with pytest.raises(ValueError, match="model_centric"):
        ParallelMoE(ExpertSpec(E, F), "model_centric", lsh=LSHConfig(enabled=True))
    with pytest.raises(ValueError, match="num_hashes"):
        CrossPolytopeLSH(D, num_hashes=0)

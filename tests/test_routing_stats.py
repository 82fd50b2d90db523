"""Routing statistics: collector counts and affinity against a naive per-token loop, dedupe, JSON
round-trip and validation, all_reduce over two gloo ranks, and the transformers experts hook."""
from __future__ import annotations

import json

import pytest
import torch

from ds_hexamoe.config import ConfigError
from ds_hexamoe.experts import (RoutingStats, RoutingStatsCollector, attach_collector, collector_of,
                                detach_collector, synthetic_stats)
from ds_hexamoe.testing import run_distributed


def _routing(T, k, E, gen):
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])


def _naive(batches, layers, experts):
    """Per-token Python loops over the same routing."""
    counts = {l: [0] * experts[l] for l in layers}
    aff = {}
    for routes in batches:  # one dict layer -> [T, k] per forward
        for li, l in enumerate(layers):
            for row in routes[l].tolist():
                for e in row:
                    counts[l][e] += 1
            if li > 0:
                a = layers[li - 1]
                m = aff.setdefault((a, l), [[0] * experts[l] for _ in range(experts[a])])
                for ra, rb in zip(routes[a].tolist(), routes[l].tolist()):
                    for i in ra:
                        for j in rb:
                            m[i][j] += 1
    return counts, aff


def test_counts_and_affinity_match_naive_loop():
    gen = torch.Generator().manual_seed(0)
    layers = ["l0", "l1", "l2"]
    experts = {"l0": 5, "l1": 7, "l2": 5}  # different expert counts: non-square affinity
    ks = {"l0": 2, "l1": 3, "l2": 1}
    c = RoutingStatsCollector()
    batches = []
    for T in (9, 17, 4):
        routes = {l: _routing(T, ks[l], experts[l], gen) for l in layers}
        batches.append(routes)
        c.step()
        for l in layers:
            c.record(l, routes[l], experts[l])
    counts, aff = _naive(batches, layers, experts)
    s = c.snapshot()
    assert s.layers == layers
    assert s.counts == counts
    assert s.affinity == aff
    assert s.tokens == {l: 30 for l in layers}
    assert s.forwards == 3
    for (a, b), m in s.affinity.items():  # every (choice in a, choice in b) pair of every token
        assert sum(map(sum, m)) == 30 * ks[a] * ks[b]


def test_recomputation_is_deduplicated_between_steps():
    gen = torch.Generator().manual_seed(1)
    r0, r1 = _routing(6, 2, 4, gen), _routing(6, 2, 4, gen)
    c = RoutingStatsCollector()
    c.step()
    c.record("a", r0, 4)
    c.record("b", r1, 4)
    c.record("a", r0, 4)  # activation checkpointing re-runs the forward in backward
    c.record("b", r1, 4)
    assert sum(c.load()["a"]) == 12 and sum(c.load()["b"]) == 12
    c.step()
    c.record("a", r0, 4)
    assert sum(c.load()["a"]) == 24
    # without dedupe a repeated layer starts a new forward: everything counts, affinity chains per forward
    d = RoutingStatsCollector(dedupe=False)
    for _ in range(2):
        d.record("a", r0, 4)
        d.record("b", r1, 4)
    s = d.snapshot()
    assert sum(s.counts["a"]) == 24 and s.forwards == 2
    assert sum(map(sum, s.affinity[("a", "b")])) == 2 * 6 * 4


def test_masked_expert_ids_and_token_mismatch():
    c = RoutingStatsCollector()
    c.step()
    idx = torch.tensor([[0, 4], [1, 2]])  # 4 >= num_experts: a masked (remote) choice is not counted
    c.record("a", idx, 4)
    assert c.load()["a"] == [1, 1, 1, 0]
    c.record("b", torch.tensor([[0]]), 4)  # another token count (Swin patch merging): no affinity
    assert c.affinity_skipped == 1 and c.snapshot().affinity == {}
    with pytest.raises(ValueError, match="top_k_index has shape"):
        c.record("c", torch.zeros(2, 2, 2, dtype=torch.long), 4)


def test_balance_json_roundtrip(tmp_path):
    s = synthetic_stats(3, 6, 200, 2, skew=1.2, seed=3)
    b = s.balance()
    for l in s.layers:
        c = s.counts[l]
        assert b["per_layer"][l] == pytest.approx(max(c) / (sum(c) / len(c)))
    # the package's one balance: the mean over layers of each layer's max / mean
    assert b["overall"] == pytest.approx(sum(b["per_layer"][l] for l in s.layers) / len(s.layers))
    assert b["overall"] > 1.2  # skewed router
    path = tmp_path / "r.json"
    s.save_json(path)
    t = RoutingStats.load_json(path)
    assert t.counts == s.counts and t.affinity == s.affinity and t.tokens == s.tokens and t.top_k == s.top_k


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("layers"), "stats.layers"),
    (lambda d: d["per_layer"]["model.layers.1.mlp.experts"]["counts"].__setitem__(2, -1),
     "stats.per_layer['model.layers.1.mlp.experts'].counts[2]"),
    (lambda d: d["per_layer"]["model.layers.0.mlp.experts"].__setitem__("top_k", 0),
     "stats.per_layer['model.layers.0.mlp.experts'].top_k"),
    (lambda d: d["affinity"][0].__setitem__("to", "nope"), "stats.affinity[0].to"),
    (lambda d: d["affinity"][0]["counts"].pop(), "stats.affinity[0].counts"),
    (lambda d: d.__setitem__("extra", 1), "stats.extra"),
    (lambda d: d["per_layer"]["model.layers.0.mlp.experts"].__setitem__("tokens", 1), "counts: sum"),
])
def test_malformed_stats_name_the_field(tmp_path, mutate, field):
    d = synthetic_stats(2, 4, 50, 2, seed=0).to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        RoutingStats.load_json(path)
    assert field in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RoutingStats.load_json(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        RoutingStats.load_json(tmp_path / "x.json")


def _reduce_worker(rank, world_size):
    gen = torch.Generator().manual_seed(10 + rank)
    c = RoutingStatsCollector()
    routes = []
    for _ in range(2):
        r = {l: _routing(5 + rank, 2, 4, gen) for l in ("a", "b")}
        routes.append(r)
        c.step()
        for l in ("a", "b"):
            c.record(l, r[l], 4)
    c.all_reduce()
    return c.snapshot().to_dict(), [{l: t.tolist() for l, t in r.items()} for r in routes]


@pytest.mark.slow
def test_all_reduce_sums_over_ranks():
    out = run_distributed(_reduce_worker, 2, timeout=120)
    batches = [{l: torch.tensor(t) for l, t in r.items()} for _, rr in out for r in rr]
    counts, aff = _naive(batches, ["a", "b"], {"a": 4, "b": 4})
    for d, _ in out:
        s = RoutingStats.from_dict(d)
        assert s.counts == counts
        assert s.affinity == aff
        assert s.tokens == {"a": 2 * 5 + 2 * 6, "b": 2 * 5 + 2 * 6}
        assert s.forwards == 4


def test_transformers_experts_forward_records_each_layer():
    transformers = pytest.importorskip("transformers")
    import ds_hexamoe  # noqa: F401  (registers "hexamoe")
    from ds_hexamoe.hetero.routing import profile_routing

    cfg = transformers.AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="hexamoe")
    batches = [torch.randint(0, 64, (2, 8)) for _ in range(3)]
    assert collector_of(model) is None
    s = profile_routing(model, batches)
    assert collector_of(model) is None  # restored
    assert s.layers == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    assert s.forwards == 3 and all(s.tokens[l] == 48 for l in s.layers)
    assert all(sum(s.counts[l]) == 96 for l in s.layers)
    assert s.model["num_experts"] == 4 and s.model["num_moe_layers"] == 3
    # the recorded routing is the router's: recompute layer 0's top-k from its gate for one batch
    ref = RoutingStatsCollector()
    attach_collector(model, ref)
    try:
        with torch.no_grad():
            ref.step()
            model(batches[0])
    finally:
        detach_collector(model, ref)
    emb = model.model.embed_tokens(batches[0])
    assert sum(ref.load()["model.layers.0.mlp.experts"]) == emb.shape[0] * emb.shape[1] * 2


def _tracker_model(impl: str):
    transformers = pytest.importorskip("transformers")
    import ds_hexamoe  # noqa: F401  (registers "hexamoe")

    cfg = transformers.AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, vocab_size=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl)


@pytest.mark.parametrize("impl", ["hexamoe", "eager"])
def test_worker_tracker_counts_through_the_collector(impl):
    """The worker's balance figure counts with the package's collector: the same counts as a collector
    attached to the experts (hexamoe) or as the router's top-k (eager); a layer re-run in backward by
    activation checkpointing counts once (a second count per forward would double every expert)."""
    from ds_hexamoe.worker import ExpertLoadTracker

    model = _tracker_model(impl)
    tracker = ExpertLoadTracker(model, torch.device("cpu"))
    assert isinstance(tracker.collector, RoutingStatsCollector)
    ref = attach_collector(model, RoutingStatsCollector()) if impl == "hexamoe" else None
    # reentrant checkpointing re-runs every layer's whole forward in backward
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    if ref is not None:
        ref.step()
    model(input_ids=ids, labels=ids).loss.backward()  # layers re-run in backward
    counts = {l: c.tolist() for l, c in tracker.counts.items()}
    assert list(counts) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(sum(c) == 2 * 8 * 2 for c in counts.values())  # tokens x top-2, once
    if ref is not None:
        assert counts == ref.snapshot().counts
    expected = sum(max(c) / (sum(c) / len(c)) for c in counts.values()) / len(counts)
    assert tracker.balance() == pytest.approx(expected) and tracker.counts == {}
    assert tracker.balance() is None

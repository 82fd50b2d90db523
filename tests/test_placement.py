"""Placement: profiles, the ILP against brute force, memory limits, batch shares, infeasible inputs,
the simulator's ordering (uniform >= planned >= ideal) and the CLI on the shipped examples."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from ds_hexamoe.config import ConfigError, HexaMoEConfig
from ds_hexamoe.placement import ilp as I
from ds_hexamoe.placement import solvers as S
from ds_hexamoe.placement.costs import CostModel, PlanOptions, integer_shares
from ds_hexamoe.placement.shapes import MODEL_SHAPES, ModelShape
from ds_hexamoe.placement.plan import Plan
from ds_hexamoe.placement.planner import plan
from ds_hexamoe.hetero.profiling import measure_profile
from ds_hexamoe.placement.profiles import DeviceProfile, builtin_profile, load_profiles
from ds_hexamoe.placement.simulator import ideal_step_time, simulate, uniform_plan
from ds_hexamoe.experts.stats import synthetic_stats

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "ds_hexamoe", "placement", "examples")

# a small MoE whose numbers land in a GPU-like regime (seconds per step, GBs)
SMALL = ModelShape(hidden=1024, expert_ffn=2048, num_experts=8, top_k=2, num_moe_layers=4, seq_len=1024,
                   num_heads=16, vocab_size=8192)


# ------------------------------------------------------------------------------------------ profiles
def test_load_profiles_table_fill_and_count(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"devices": [
        {"name": "A100-40GB"},
        {"name": "h100", "tflops": 500, "count": 2},
        {"name": "custom", "attn_tflops": 50, "expert_tflops": 40, "memory_gb": 24, "bandwidth_gbps": 16, "slowdown": 2},
    ]}))
    p = load_profiles(path)
    assert [x.name for x in p] == ["A100-40GB", "H100-SXM", "H100-SXM", "custom"]
    assert p[0].attn_tflops == 312 and p[0].memory_bytes == 40e9 and p[0].bandwidth_gbps == 300
    assert p[1].attn_tflops == 500 and p[1].memory_bytes == 80e9  # declared number wins, table fills the rest
    assert p[3].expert_flops == 40e12 / 2  # slowdown divides speed
    # hexamoe.devices entries (the same DeviceProfile type) and names work too
    declared = HexaMoEConfig.from_dict({"devices": [{"name": "V100", "memory_gb": 16.0}]}).devices
    q = load_profiles(declared + ["T4"])
    assert q[0].name == "V100-32GB" and q[0].memory_bytes == 16e9 and q[1].attn_tflops == 65
    assert builtin_profile("NVIDIA H100 80GB HBM3").name == "H100-SXM"


@pytest.mark.parametrize("devices,field", [
    ([{"name": "A100-40GB"}, {"name": "x", "tflops": -1, "memory_gb": 1, "bandwidth_gbps": 1}], "devices[1].tflops: got -1"),
    ([{"name": "A100-40GB"}, {"name": "unknown-gpu", "memory_gb": 8, "bandwidth_gbps": 8}], "devices[1].tflops: missing"),
    ([{"name": "T4", "memory_gb": "lots"}], "devices[0].memory_gb"),
    ([{"name": "T4", "slowdown": 0.5}], "devices[0].slowdown"),
    ([{"name": "T4", "count": 0}], "devices[0].count"),
    ([{"name": "T4", "speed": 3}], "devices[0].speed: unknown key"),
    ([], "devices: got []"),
])
def test_malformed_devices_name_the_field(tmp_path, devices, field):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"devices": devices}))
    with pytest.raises(ConfigError) as e:
        load_profiles(path)
    assert field in str(e.value)


def test_measure_profile_on_cpu():
    p = measure_profile("cpu", tokens=256, hidden=128, ffn=256, num_experts=4, repeats=2)
    assert p.attn_tflops > 0 and p.expert_tflops > 0 and p.memory_bytes > 1e9
    assert p.attn_tflops < 100  # a CPU core does not do 100 TFLOP/s: the FLOP count and timing are sane
    assert 0.1 < p.memory_bandwidth_gbps < 2000  # a copy: read + write bytes over its time


# ---------------------------------------------------------------------------------------- ILP = brute force
def _random_problem(rng, L, E, R, replicas=0, slots=None):
    return S.PlacementProblem(
        loads=rng.integers(1, 100, size=(L, E)).astype(float),
        hops=[rng.integers(0, 30, size=(E, E)).astype(float) for _ in range(L - 1)],
        home=rng.dirichlet(np.ones(R)), pair_cost=rng.uniform(1, 3, R), hop_cost=rng.uniform(0.1, 1, R),
        host_cost=rng.uniform(0, 20, R), overlap=rng.uniform(0, 30, R), base=rng.uniform(0, 50, R),
        slots=np.array(slots if slots is not None else [E] * R), replicas=replicas)


def _brute_force(P):
    """Every placement of the replica units onto ranks, scored by the same objective."""
    L, E, R = P.shape
    n = S._units(P)
    units = [(l, e) for l in range(L) for e in range(E) for _ in range(n[l][e])]
    best = np.inf
    for assign in itertools.product(range(R), repeat=len(units)):
        F = np.zeros((L, E, R))
        ok = True
        for (l, e), r in zip(units, assign):
            if F[l, e, r] > 0:  # two replicas of one expert on one rank
                ok = False
                break
            F[l, e, r] = 1.0 / n[l][e]
        if ok and not ((F > 0).sum(axis=1) > P.slots[None]).any():
            best = min(best, S.objective(P, F))
    return best


@pytest.mark.parametrize("seed,L,E,R,replicas,slots", [
    (0, 2, 4, 2, 0, None),
    (1, 2, 3, 3, 1, None),
    (2, 1, 5, 2, 0, None),
    (3, 2, 4, 2, 0, [2, 2]),  # memory binds: exactly 2 experts per rank and layer
    (4, 3, 3, 2, 1, None),
])
def test_ilp_equals_brute_force(seed, L, E, R, replicas, slots):
    P = _random_problem(np.random.default_rng(seed), L, E, R, replicas, slots)
    best = _brute_force(P)
    r = I.solve_ilp(P, joint=True)
    assert r.status == "optimal"
    assert r.objective == pytest.approx(best, rel=1e-6)
    S.check_solution(P, r.F)
    # the ilp solver (with its greedy fallback) is never worse than greedy or the optimum
    res = S.solve("ilp", P)
    assert res.objective <= min(best, S.greedy(P).objective) * (1 + 1e-6)


def test_objective_matches_an_explicit_token_walk():
    """rank_times equals walking every token the way the runtime moves it: at every layer from its home
    rank to the rank of its expert and back (dispatch and combine), never expert to expert. Fails on the
    old cost, which sent tokens from the layer-l expert's rank straight to the layer-(l+1) one and paid
    home traffic only at the first and the last layer."""
    rng = np.random.default_rng(5)
    L, E, R = 3, 3, 3
    P = _random_problem(rng, L, E, R, 0)
    F = rng.dirichlet(np.ones(R), size=(L, E))
    t = S.rank_times(P, F)
    ref = P.base.copy()
    for r in range(R):
        ref[r] += P.pair_cost[r] * sum(P.loads[l, e] * F[l, e, r] for l in range(L) for e in range(E))
        ref[r] += sum(max(0.0, (F[l, :, r] > 0).sum() * P.host_cost[r] - P.overlap[r]) for l in range(L))
        hops = 0.0
        for l in range(L):
            for e in range(E):
                for home in range(R):
                    for dst in range(R):
                        v = P.loads[l, e] * P.home[home] * F[l, e, dst]
                        if home != dst and r in (home, dst):
                            hops += 2 * v  # there (dispatch) and back (combine)
        ref[r] += P.hop_cost[r] * hops
    np.testing.assert_allclose(t, ref, rtol=1e-10)
    # the cost of one layer does not depend on where the neighbouring layers put their experts
    G = F.copy()
    G[0] = np.roll(F[0], 1, axis=1)
    np.testing.assert_allclose(S.rank_times(P, G) - S.rank_times(P, G, upto=1),
                               S.rank_times(P, F) - S.rank_times(P, F, upto=1), rtol=1e-10)


@pytest.mark.parametrize("solver", ["greedy", "eplb", "ilp"])
def test_solvers_respect_memory_slots(solver):
    rng = np.random.default_rng(7)
    P = _random_problem(rng, 3, 6, 3, replicas=2, slots=[1, 2, 3])  # 6 slots for 6 experts: tight
    P.loads[:, 0] *= 20  # a very hot expert tempts every solver to replicate it
    r = S.solve(solver, P)
    hosted = (r.F > S.EPS).sum(axis=1)
    assert (hosted <= P.slots[None, :]).all()
    np.testing.assert_allclose(r.F.sum(axis=2), 1.0)
    P.slots = np.array([1, 2, 2])  # 5 slots < 6 experts: infeasible before any solving
    with pytest.raises(ConfigError, match="total memory is too small"):
        S.solve(solver, P)


def test_greedy_balances_by_speed():
    """bubble_squeeze: with no communication, per-rank expert time levels out across speeds 1x, 2x, 4x."""
    L, E, R = 1, 16, 3
    rng = np.random.default_rng(0)
    P = S.PlacementProblem(loads=rng.uniform(50, 150, (L, E)), hops=[], home=np.ones(R) / R,
                           pair_cost=np.array([4.0, 2.0, 1.0]), hop_cost=np.zeros(R), host_cost=np.zeros(R),
                           overlap=np.zeros(R), base=np.zeros(R), slots=np.full(R, E))
    r = S.solve("greedy", P)
    t = S.rank_times(P, r.F)
    assert t.max() / t.min() < 1.05
    assert t.max() == pytest.approx(P.loads.sum() / (1 / 4 + 1 / 2 + 1), rel=0.05)


# ----------------------------------------------------------------------------------------- planner
def _stats(model, seed=0):
    return synthetic_stats(model.num_moe_layers, model.num_experts, 500, model.top_k, seed=seed)


def test_three_times_slower_rank_gets_a_quarter_of_the_batch():
    profiles = [DeviceProfile("fast", 300, 300, int(80e9), 300), DeviceProfile("slow", 100, 100, int(80e9), 300)]
    p = plan(profiles, _stats(SMALL), global_batch=100, model_shape=SMALL, mode="data_centric")
    assert p.batch_shares == [75, 25]
    # the same through the slowdown factor of a declared table profile, whose memory bandwidth also makes
    # the slow rank's optimizer step over its expert shard 3x longer; that step comes after the last
    # layer's collectives, so taking samples off the slow rank would only make the fast one late at every
    # layer: the shares stay by speed
    p2 = plan(load_profiles([{"name": "A100-80GB"}, {"name": "A100-80GB", "slowdown": 3}]), _stats(SMALL),
              global_batch=100, model_shape=SMALL, mode="data_centric")
    assert p2.batch_shares == [75, 25]
    p3 = plan(load_profiles([{"name": "A100-80GB", "memory_bandwidth_gbps": 0},
                             {"name": "A100-80GB", "slowdown": 3, "memory_bandwidth_gbps": 0}]), _stats(SMALL),
              global_batch=100, model_shape=SMALL, mode="data_centric")
    assert p3.batch_shares == [75, 25]
    assert sum(p.batch_shares) == 100


def test_step_overhead_enters_simulation_ideal_and_shares():
    stats = _stats(SMALL)
    base = plan(load_profiles([{"name": "A100-80GB"}, {"name": "A100-80GB", "slowdown": 3}]), stats,
                global_batch=100, model_shape=SMALL, mode="data_centric")
    step = base.predicted["step_time"]
    # a per-step overhead of a fifth of the step, paid 3x by the slow rank
    ov = 0.2 * step
    profiles = load_profiles([{"name": "A100-80GB", "step_overhead_s": ov},
                              {"name": "A100-80GB", "slowdown": 3, "step_overhead_s": ov}])
    assert profiles[1].step_overhead == pytest.approx(3 * ov)
    p = plan(profiles, stats, global_batch=100, model_shape=SMALL, mode="data_centric")
    cost = CostModel(profiles, stats, SMALL, 100, PlanOptions())
    sim = simulate(p, cost)
    busy = [d + m + f + u for d, m, f, u in zip(sim.dense, sim.moe, cost.fixed, sim.update)]
    assert sim.busy == pytest.approx(busy) and sim.sum_bound == pytest.approx(max(busy) + sim.sync)
    # ranks wait for each other at every layer: never faster than the busiest rank's sum
    assert sim.sync > 0 and sim.step_time >= max(busy) + sim.sync
    np.testing.assert_allclose(np.add(sim.busy, sim.idle) + sim.sync, sim.step_time)
    # the optimizer step over each shard: its bytes at the rank's memory bandwidth (slowdown applied)
    upd = [w * SMALL.expert_update_bytes / (2039e9 / s) for w, s in zip(p.shard_weights, (1, 3))]
    assert sim.update == pytest.approx(upd)
    # the slow rank's larger fixed cost leaves it less of the batch than its speed alone would
    assert p.batch_shares[1] < base.batch_shares[1] and sum(p.batch_shares) == 100
    # the ideal bound: every rank pays its own overhead, the rest of the work is spread by speed
    # (closed form while no rank's overhead alone exceeds the bound)
    work = base.predicted["ideal_step_time"] * (1 + 1 / 3)
    tau = (work + ov * 1 + 3 * ov / 3) / (1 + 1 / 3)
    assert 3 * ov < tau and ideal_step_time(cost) == pytest.approx(tau, rel=1e-3)
    assert p.predicted["step_time"] >= p.predicted["ideal_step_time"]
    with pytest.raises(ConfigError, match=r"devices\[0\]\.step_overhead_s: got -1; expected a number >= 0"):
        load_profiles([{"name": "A100-80GB", "step_overhead_s": -1}])


def test_collective_latency_and_dense_sync_in_the_step():
    """Every rank pays the slowest link's latency per collective (4 for the dense sync, 4 per FSSDP
    data-centric layer with re-materialization) and ZeRO-2's dense-gradient sync on the slowest link; the
    ideal bound has neither; idle is waiting for the busiest peer."""
    stats = _stats(SMALL)
    slow_link = [{"name": "A100-80GB", "latency_us": 50.0}, {"name": "A100-PCIe"}]
    profiles = load_profiles(slow_link)
    assert [p.latency_us for p in profiles] == [50.0, 20.0]  # declared, then the table's PCIe value
    p = plan(profiles, stats, global_batch=100, model_shape=SMALL, mode="data_centric")
    cost = CostModel(profiles, stats, SMALL, 100, PlanOptions())
    sim = simulate(p, cost)
    n = 4 + SMALL.num_moe_layers * 4
    dense = 2 * 0.5 * SMALL.dense_params * 2 / (32 * 1e9)  # (R-1)/R of bf16 dense bytes, twice, at PCIe 32 GB/s
    assert sim.sync == pytest.approx(50e-6 * n + dense)
    assert sim.step_time == pytest.approx(max(sim.busy) + sim.sync) and min(sim.idle) == 0.0
    assert p.predicted["sync_time"] == pytest.approx(sim.sync)
    no_lat = CostModel(load_profiles([{"name": "A100-80GB", "latency_us": 0}, {"name": "A100-PCIe", "latency_us": 0}]),
                       stats, SMALL, 100, PlanOptions())
    assert no_lat.sync_time(["data_centric"] * SMALL.num_moe_layers) == pytest.approx(dense)
    assert ideal_step_time(cost) == pytest.approx(ideal_step_time(no_lat))
    one = CostModel(load_profiles([{"name": "A100-80GB"}]), stats, SMALL, 100, PlanOptions())
    assert one.sync_time(["data_centric"] * SMALL.num_moe_layers) == 0.0
    with pytest.raises(ConfigError, match=r"devices\[1\]\.latency_us: got -1; expected a number >= 0"):
        load_profiles([{"name": "A100-80GB"}, {"name": "A100-80GB", "latency_us": -1}])


def test_integer_shares_keep_total_and_caps():
    s = integer_shares([3, 1, 1], 10, caps=[5, 10, 10])
    assert sum(s) == 10 and s[0] == 5
    assert integer_shares([1, 1, 1], 10) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    with pytest.raises(ConfigError, match="global_batch: got 30"):
        integer_shares([1, 1], 30, caps=[10, 10])


@pytest.mark.parametrize("solver", ["greedy", "eplb", "ilp"])
def test_plan_orders_uniform_planned_ideal_and_fits_memory(solver):
    profiles = load_profiles(["H100", "A100-80GB", "A40", "V100-32GB"])
    stats = _stats(SMALL, seed=1)
    p = plan(profiles, stats, global_batch=32, model_shape=SMALL, solver=solver, time_limit=5)
    pr = p.predicted
    assert pr["uniform_step_time"] >= pr["step_time"] >= pr["ideal_step_time"] > 0
    assert pr["speedup_vs_uniform"] > 1.3  # a 6.6x spread of speeds leaves a lot for the plan
    assert all(u <= m for u, m in zip(pr["per_rank"]["memory_gb"], pr["per_rank"]["memory_limit_gb"]))
    assert sum(p.batch_shares) == 32 and abs(sum(p.shard_weights) - 1) < 1e-9
    # the plan re-simulates to the same prediction, also after a JSON round-trip
    cost = CostModel(profiles, stats, SMALL, 32, PlanOptions())
    q = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert simulate(q, cost).step_time == pytest.approx(pr["step_time"])
    assert q.placement == p.placement and q.modes == p.modes
    for l in p.layers:
        for e, ranks in p.placement[l].items():
            assert abs(sum(p.token_fractions[l][e].values()) - 1) < 1e-9 and ranks
    assert ideal_step_time(cost) == pytest.approx(pr["ideal_step_time"])
    assert simulate(uniform_plan(cost), cost).step_time == pytest.approx(pr["uniform_step_time"])


def test_homogeneous_cluster_gains_nothing_from_batch_shares():
    profiles = load_profiles([{"name": "H100", "count": 4}])
    p = plan(profiles, _stats(SMALL), global_batch=32, model_shape=SMALL, mode="data_centric")
    assert p.batch_shares == [8, 8, 8, 8]
    assert p.predicted["step_time"] == pytest.approx(p.predicted["uniform_step_time"])


def test_planner_memory_limits_respected():
    profiles = load_profiles(["H100", "H100"])
    stats = _stats(SMALL)
    cost = CostModel(profiles, stats, SMALL, 8, PlanOptions())
    sw = cost.shard_weights()
    fixed = cost.fixed_bytes(sw)[0]
    unit = cost.cache_unit * 2
    # room for 3 experts of cache and 2 samples of activations on rank 0; rank 1 roomy
    lim0 = (fixed + 3 * unit + 2 * cost.act_per_sample) / 1e9 * 1.0001
    def used0(p):  # rank 0's bytes recomputed from the plan itself: shards, activations, hosted experts
        hosted = max(sum(0 in r for r in p.placement[l].values()) for l in p.layers)
        fixed0 = cost.dense_state()[0] + p.shard_weights[0] * cost.expert_state_total()
        return (fixed0 + p.batch_shares[0] * cost.act_per_sample + hosted * unit) / 1e9

    free = plan(profiles, stats, global_batch=8, model_shape=SMALL, mode="expert_parallel")
    assert used0(free) > lim0  # without the limit the plan would not fit: the limit binds
    for solver in ("greedy", "eplb", "ilp"):
        p = plan(profiles, stats, global_batch=8, model_shape=SMALL, solver=solver, mode="expert_parallel",
                 memory_limits=[lim0, 80.0])
        assert used0(p) <= lim0
        assert p.predicted["per_rank"]["memory_gb"][0] == pytest.approx(used0(p))


def test_infeasible_inputs_raise_before_solving():
    stats = _stats(MODEL_SHAPES["mixtral-8x7b"])
    with pytest.raises(ConfigError, match="total memory is too small"):  # 47B params on 2 GPUs
        plan(load_profiles(["H100", "H100"]), stats, global_batch=8, model_shape="mixtral-8x7b")
    big_expert = ModelShape(hidden=16384, expert_ffn=131072, num_experts=2, top_k=1, num_moe_layers=1, seq_len=128,
                            vocab_size=1000)  # one expert: 6.4B params, 25.8 GB with its gradient, double-buffered
    s2 = synthetic_stats(1, 2, 100, 1)
    with pytest.raises(ConfigError, match="more than any device has free"):
        plan(load_profiles([{"name": "T4", "count": 32}]), s2, global_batch=4, model_shape=big_expert)
    with pytest.raises(ConfigError, match="global_batch"):
        plan(load_profiles(["H100"]), _stats(SMALL), global_batch=100000, model_shape=SMALL)
    with pytest.raises(ConfigError, match="solver"):
        plan(load_profiles(["H100"]), _stats(SMALL), global_batch=8, model_shape=SMALL, solver="magic")
    with pytest.raises(ConfigError, match="num_moe_layers"):
        plan(load_profiles(["H100"]), synthetic_stats(2, 8, 50, 2), global_batch=8, model_shape=SMALL)
    with pytest.raises(ConfigError, match="model: missing"):
        plan(load_profiles(["H100"]), _stats(SMALL), global_batch=8)


# ---------------------------------------------------------------------------------------------- CLI
def test_plan_cli_on_examples(tmp_path, capsys):
    from ds_hexamoe.cli.plan import plan_main
    from ds_hexamoe.placement.report import report

    out, png = tmp_path / "plan.json", tmp_path / "load.png"
    rc = plan_main(["--devices", os.path.join(EXAMPLES, "devices.json"), "--stats", os.path.join(EXAMPLES, "routing.json"),
                    "--global-batch", "48", "--solver", "eplb", "--out", str(out), "--png", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "uniform" in text and "ideal" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    p = Plan.load_json(out)
    assert p.world_size == 8 and sum(p.batch_shares) == 48
    assert "predicted step" in report(p)
    rc = plan_main(["--devices", str(tmp_path / "none.json"), "--stats", os.path.join(EXAMPLES, "routing.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_ilp_solves_even_when_greedys_fractional_split_is_better():
    """Greedy water-fills experts into token fractions, which no whole-expert placement reaches; bounding the
    MILP by it made HiGHS report "infeasible", and ``ilp`` returned greedy without its own optimum. EPLB's
    packing (a whole-expert point) bounds it now: the ILP's optimum is reported beside greedy's."""
    # one expert, two equal ranks: greedy halves it, a whole expert sits on one rank
    P = S.PlacementProblem(loads=np.array([[100.0]]), hops=[], home=np.array([0.5, 0.5]),
                           pair_cost=np.ones(2), hop_cost=np.zeros(2), host_cost=np.zeros(2), overlap=np.zeros(2),
                           base=np.zeros(2), slots=np.array([1, 1]), replicas=0)
    g, best = S.greedy(P), _brute_force(P)
    assert g.objective < best * (1 - 1e-6)
    res = S.solve("ilp", P)
    assert res.objective == pytest.approx(g.objective)  # still never worse than greedy
    assert res.meta["ilp_objective"] == pytest.approx(best, rel=1e-6)
    assert "infeasible" not in res.status.lower() and "fractional" in res.status

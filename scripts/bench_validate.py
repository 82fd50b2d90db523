"""``bench_hetero.py --validate``: the simulator against the runtime, per execution mode, on gloo CPU ranks.

Each rank trains a stack of ``L`` blocks (a dense part standing in for attention, then one MoE layer
through the runtime's layer core of the mode: ``DataCentricMoE``, ``ExpertParallelMoE``,
``ModelCentricMoE``) with SGD. Per mode it reports the bytes per rank per layer the runtime's accounting
recorded beside the simulator's count from the routing the run saw (:func:`~ds_hexamoe.placement.
simulator.routing_bytes`: must be equal), and the median measured step (the slowest rank's wall time)
beside the step the event timeline predicts from rates measured first on the same ranks at the same time
(dense and expert seconds per row, optimizer step, link latency and bandwidth). ``auto_choice`` is the
mode with the smallest predicted step; it is compared with the measured fastest.

Scenarios: ``equal`` (equal ranks, balanced routing), ``slow_rank`` (rank 1's dense part 3x the work:
slower at attention), ``skewed`` (a hot expert: most tokens pick expert 0), ``uneven_batch`` (rank 0
holds 4x the tokens of each other rank: data-centric leaves its expert work there, the exchanging modes
spread it).
"""
from __future__ import annotations

import statistics

from bench_common import Col, Laps, Table, calibrate_link, time_calls, uptime, write_json

SCENARIOS = {"equal": dict(slow=1, skew=0.0), "slow_rank": dict(slow=3, skew=0.0), "skewed": dict(slow=1, skew=3.0),
             "uneven_batch": dict(slow=1, skew=0.0, rank0_tokens=4.0)}
MODES = ("data_centric", "expert_parallel", "model_centric")
SHAPE = dict(E=8, D=128, F=256, K=2, L=2, T=512, dense_reps=6)


def _routing(step: int, rank: int, T: int, E: int, K: int, skew: float):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] += skew
    w, idx = torch.softmax(logits, -1).topk(K, -1)
    return w, idx


class _Block:
    def __init__(self, s: dict, reps: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        D, F, E = s["D"], s["F"], s["E"]
        self.dense = [(torch.randn(D, D, generator=g) / D**0.5).requires_grad_() for _ in range(reps)]
        self.w1 = (torch.randn(E, D, 2 * F, generator=g) / D**0.5).requires_grad_()
        self.w2 = (torch.randn(E, F, D, generator=g) / F**0.5).requires_grad_()

    def params(self):
        return self.dense + [self.w1, self.w2]

    def run_dense(self, x):
        for m in self.dense:
            x = x + 0.1 * (x @ m).tanh()
        return x


def _modes(rank, world, s, acc):
    from ds_hexamoe.parallel import ExpertParallelMoE, ExpertSpec, ModelCentricMoE
    from ds_hexamoe.parallel.data_centric import DataCentricMoE

    spec = ExpertSpec(s["E"], s["F"], act="silu", gated=True)
    placement = {e: [e % world] for e in range(s["E"])}
    return spec, placement, {"data_centric": DataCentricMoE(spec, accounting=acc),
                             "expert_parallel": ExpertParallelMoE(spec, accounting=acc),
                             "model_centric": ModelCentricMoE(spec, accounting=acc)}


def _step(mode, layer_fn, blocks, x, routes, spec, placement, opt):
    from ds_hexamoe.parallel import ReplicatedExperts

    for b, (w, idx) in zip(blocks, routes):
        x = b.run_dense(x)
        mat = ReplicatedExperts(spec, b.w1, b.w2)
        extra = (placement,) if mode == "expert_parallel" else ()
        x = x + layer_fn(x, idx, w, *extra, mat)
    x.square().mean().backward()
    opt.step()
    opt.zero_grad()


def _calibrate(rank, world, s, blocks, spec, skew=0.0, reps=5):
    """Seconds per row of this rank's dense part and of expert rows (fwd + bwd), and of the SGD step,
    measured on all ranks at once (they share the machine as in the runs)."""
    import torch

    from ds_hexamoe.parallel import ReplicatedExperts
    from ds_hexamoe.parallel.local_experts import compute_experts

    T, K = s["T"], s["K"]
    b = blocks[0]
    mat = ReplicatedExperts(spec, b.w1, b.w2)
    w, idx = _routing(0, rank, T, s["E"], K, skew)  # the scenario's routing law, not its steps
    dense, expert = Laps(), Laps()
    for _ in range(reps):
        torch.distributed.barrier()
        x = torch.randn(T, s["D"], requires_grad=True)
        with dense.lap():
            b.run_dense(x).sum().backward()
        with expert.lap():
            xs = x.detach().repeat_interleave(K, 0).requires_grad_()
            compute_experts(xs, idx.reshape(-1, 1).int(), w.reshape(-1, 1), mat(list(range(s["E"]))),
                            spec).sum().backward()
    opt = torch.optim.SGD([p for bl in blocks for p in bl.params()], lr=1e-3)

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=False)

    return {"dense_row_s": dense.median() / T, "expert_row_s": expert.median() / (T * K),
            "opt_s": statistics.median(time_calls(opt_step, reps))}


def _calibrate_call(rank, s, block, spec, placement, layer_fn, acc, mode, skew=0.0, reps=5):
    """One MoE layer call (forward and backward) of ``mode`` on calibration routing: its wall time, the
    rows this rank computed and the bytes it moved, so the driver can price what the layer costs beyond
    compute and bandwidth (collective start-up, index building, ranks sharing the cores)."""
    import torch

    from ds_hexamoe.parallel import ReplicatedExperts

    w, idx = _routing(0, rank, s["T"], s["E"], s["K"], skew)
    walls = Laps()
    for _ in range(reps):
        x = torch.randn(s["T"], s["D"], requires_grad=True)
        mat = ReplicatedExperts(spec, block.w1, block.w2)
        extra = (placement,) if mode == "expert_parallel" else ()
        torch.distributed.barrier()
        with walls.lap():
            layer_fn(x, idx, w, *extra, mat).sum().backward()
    c = acc.last()
    acc.reset()
    return {"wall_s": walls.median(), "rows": c.rows_computed, "bytes": max(c.bytes_sent(), c.bytes_received())}


def _calibrate_all(rank, world, s, blocks, spec, placement, layers, acc, skew, reps) -> dict:
    cal = _calibrate(rank, world, s, blocks, spec, skew, reps)
    cal["calls"] = {m: _calibrate_call(rank, s, blocks[0], spec, placement, layers[m], acc, m, skew, reps)
                    for m in MODES[1:]}
    return cal


def _median_cal(cals: list) -> dict:
    if isinstance(cals[0], dict):
        return {k: _median_cal([c[k] for c in cals]) for k in cals[0]}
    return statistics.median(cals)


def _worker(rank, world, s, scenario, steps, warmup):
    """The three modes interleaved step by step, so every mode runs under the same load, and a
    calibration round before every measured step (medians over the rounds: the shared machine drifts)."""
    import numpy as np
    import torch

    from ds_hexamoe.parallel.accounting import TokenAccounting

    torch.set_num_threads(1)
    sc = SCENARIOS[scenario]
    acc = TokenAccounting(history=1 << 12)
    reps = s["dense_reps"] * (sc["slow"] if rank == 1 else 1)
    blocks = [_Block(s, reps, 7 + l) for l in range(s["L"])]
    spec, placement, layers = _modes(rank, world, s, acc)
    T = int(s["T"] * sc["rank0_tokens"]) if rank == 0 and "rank0_tokens" in sc else s["T"]
    s_rank = dict(s, T=T)  # rates sampled at the rank's own token count (per-row cost depends on it)
    cals = [_calibrate_all(rank, world, s_rank, blocks, spec, placement, layers, acc, sc["skew"], 3)]
    opts = {m: torch.optim.SGD([p for b in blocks for p in b.params()], lr=1e-3) for m in MODES}
    runs = {m: {"walls": [], "bytes": [], "routing": []} for m in MODES}
    for i in range(warmup + steps):
        routes = [_routing(100 * i + l + 1, rank, T, s["E"], s["K"], sc["skew"]) for l in range(s["L"])]
        x = torch.randn(T, s["D"], generator=torch.Generator().manual_seed(i + 50 * rank))
        if i >= warmup:  # rates sampled between the steps, under the load the steps see
            cals.append(_calibrate_all(rank, world, s_rank, blocks, spec, placement, layers, acc, sc["skew"], 1))
        for mode in MODES:
            acc.reset()
            torch.distributed.barrier()
            wall = Laps()
            with wall.lap():
                _step(mode, layers[mode], blocks, x, routes, spec, placement, opts[mode])
            if i >= warmup:
                r = runs[mode]
                r["walls"].append(wall.last)
                r["bytes"].append([[c.bytes_sent(), c.bytes_received()] for c in acc.calls])
                r["routing"].append([idx.numpy().astype(np.int64) for _, idx in routes])
    return {"calibration": _median_cal(cals), "modes": runs}


def _predict_step(mode, routing, world, s, cal, link) -> float:
    """The step on the event timeline: per layer dense, the mode's collectives and expert rows, forward
    (a third) then backward in reverse (two thirds), then each rank's SGD step. A collective costs each
    rank its latency share plus its larger direction's bytes over the link bandwidth."""
    import numpy as np

    from ds_hexamoe.placement.simulator import routing_bytes
    from ds_hexamoe.placement.timeline import Timeline
    from ds_hexamoe.placement.traffic import owner_destinations

    E, K, F = s["E"], s["K"], s["F"]
    owner = [e % world for e in range(E)]
    dest = [owner_destinations(r, owner) if mode == "expert_parallel" else None for r in routing]
    nbytes = routing_bytes([mode] * len(routing), routing, s["D"], 4, dest)
    dense = np.array([c["dense_row_s"] for c in cal]) * np.array([len(routing[0][r]) for r in range(world)])
    erow = np.array([c["expert_row_s"] for c in cal])
    f_share = np.array([hi for hi in _mc_slices(F, world)]) / F
    layers = []
    for l, rt in enumerate(routing):
        T = np.array([len(a) for a in rt])
        if mode == "data_centric":
            rows = T * K
        elif mode == "expert_parallel":
            rows = np.array([sum(int((d == r).sum()) for d in dest[l]) for r in range(world)])
        else:
            rows = T.sum() * K * f_share
        b = np.maximum(nbytes[l]["sent"], nbytes[l]["received"])
        comm = 0.0 if mode == "data_centric" else _fixed_coll_s(mode, cal, link) + b / 4 / (link["bandwidth_gbps"] * 1e9)
        layers.append((rows * erow, comm))
    tl = Timeline(world)
    for work, comm in layers:
        tl.compute(dense / 3, "dense")
        if mode != "data_centric":
            tl.collective(comm, "exchange")
        tl.compute(work / 3, "experts")
        if mode != "data_centric":
            tl.collective(comm, "exchange")
    for work, comm in reversed(layers):
        if mode != "data_centric":
            tl.collective(comm, "exchange")
        tl.compute(2 * work / 3, "experts")
        if mode != "data_centric":
            tl.collective(comm, "exchange")
        tl.compute(2 * dense / 3, "dense")
    tl.compute(np.array([c["opt_s"] for c in cal]), "optimizer")
    return tl.end


def _fixed_coll_s(mode, cal, link) -> float:
    """Seconds each of a layer's four exchanges costs beyond its bytes, from the calibration call: its
    wall time less the slowest rank's expert rows and the bytes over the bandwidth (never below the
    link's latency)."""
    calls = [c["calls"][mode] for c in cal]
    # model-centric rows run a 1/world slice of f: priced as in the prediction
    scale = 1.0 / len(cal) if mode == "model_centric" else 1.0
    compute = max(c["rows"] * scale * k["expert_row_s"] for c, k in zip(calls, cal))
    wire = max(c["bytes"] for c in calls) / (link["bandwidth_gbps"] * 1e9)
    wall = max(c["wall_s"] for c in calls)
    return max(link["latency_us"] * 1e-6, (wall - compute - wire) / 4)


def _mc_slices(F: int, world: int) -> list[int]:
    from ds_hexamoe.parallel import split_hidden

    return split_hidden(F, [1.0] * world)


def validate(world: int, scenarios=tuple(SCENARIOS), steps: int = 5, warmup: int = 2, shape: dict | None = None) -> dict:
    """Per scenario and mode: bytes per rank per layer (measured by the runtime's accounting, predicted
    from the routing; compared step by step and layer by layer), measured and predicted step, and the
    ``auto`` choice (the smallest predicted step) against the measured fastest."""
    from ds_hexamoe.placement.simulator import routing_bytes
    from ds_hexamoe.placement.traffic import owner_destinations
    from ds_hexamoe.testing import run_distributed

    s = dict(SHAPE, **(shape or {}))
    link = calibrate_link(world)
    out = {"world_size": world, "shape": s, "link": link, "steps": steps, "warmup": warmup, "scenarios": {}}
    for name in scenarios:
        res = run_distributed(_worker, world, s, name, steps, warmup, timeout=900)
        cal = [r["calibration"] for r in res]
        rows = {}
        for mode in MODES:
            per_rank = [r["modes"][mode] for r in res]
            walls = [max(p["walls"][i] for p in per_rank) for i in range(steps)]
            pred_b, meas_b, preds = [], [], []
            for i in range(steps):
                routing = [[per_rank[r]["routing"][i][l] for r in range(world)] for l in range(s["L"])]
                owner = [e % world for e in range(s["E"])]
                dest = [owner_destinations(rt, owner) if mode == "expert_parallel" else None for rt in routing]
                pred_b.append([b["sent"] for b in routing_bytes([mode] * s["L"], routing, s["D"], 4, dest)])
                meas_b.append([[per_rank[r]["bytes"][i][l][0] if per_rank[r]["bytes"][i] else 0 for r in range(world)]
                               for l in range(s["L"])])
                preds.append(_predict_step(mode, routing, world, s, cal, link))
            rows[mode] = {"predicted_bytes_per_rank_layer": pred_b[-1], "measured_bytes_per_rank_layer": meas_b[-1],
                          "bytes_equal_every_step": pred_b == meas_b, "predicted_step_s": statistics.median(preds),
                          "measured_step_s": statistics.median(walls), "walls_s": walls}
            rows[mode]["prediction_error"] = rows[mode]["predicted_step_s"] / rows[mode]["measured_step_s"] - 1
        fastest = min(MODES, key=lambda m: rows[m]["measured_step_s"])
        auto = min(MODES, key=lambda m: rows[m]["predicted_step_s"])
        ratio = rows[auto]["measured_step_s"] / rows[fastest]["measured_step_s"]
        out["scenarios"][name] = {"modes": rows, "calibration": cal, "auto_choice": auto, "measured_fastest": fastest,
                                  "auto_vs_fastest": ratio, "auto_within_10pct": ratio <= 1.10}
    sc = out["scenarios"].values()
    out["goals"] = {"bytes_equal": all(m["bytes_equal_every_step"] for v in sc for m in v["modes"].values()),
                    "prediction_within_15pct": all(abs(m["prediction_error"]) <= 0.15 for v in sc for m in v["modes"].values()),
                    "auto_within_10pct_scenarios": sum(v["auto_within_10pct"] for v in sc)}
    return out


def print_validate(v: dict) -> None:
    print(f"\nvalidate on {v['world_size']} gloo CPU ranks (link {v['link']['latency_us']:.0f} us, "
          f"{v['link']['bandwidth_gbps']:.2f} GB/s); median of {v['steps']} steps")
    t = Table(Col("scenario", "<13"), Col("mode", "<17"), Col("bytes/rank, layer 0", ">24"), Col("equal", ">7"),
              Col("meas s", ">9.4f"), Col("pred s", ">9.4f"), Col("err", ">7.1f", "%"))
    print(t.rule())
    for name, sc in v["scenarios"].items():
        for mode, r in sc["modes"].items():
            b = "/".join(str(x) for x in r["measured_bytes_per_rank_layer"][0])
            print(t.row(name, mode, b, str(r["bytes_equal_every_step"]), r["measured_step_s"], r["predicted_step_s"],
                        100 * r["prediction_error"]))
        print(f"{'':<13}auto -> {sc['auto_choice']}, measured fastest {sc['measured_fastest']} "
              f"(auto's step x{sc['auto_vs_fastest']:.2f} of fastest)")
    g = v["goals"]
    print(f"goals: bytes equal {g['bytes_equal']}; prediction within 15% {g['prediction_within_15pct']}; "
          f"auto within 10% in {g['auto_within_10pct_scenarios']} of {len(v['scenarios'])} scenarios")


def cli(argv) -> int:
    """``bench_hetero.py --validate [--world N] [--json F] [--scenarios ...] [--steps S]``."""
    import argparse

    ap = argparse.ArgumentParser(description="simulator against the runtime, per execution mode")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json", default="bench_validate.json")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.world < 2:
        raise SystemExit(f"--world: got {args.world}; the modes exchange tokens between ranks, give 2 or more")
    start = uptime()
    print(f"uptime: {start}")
    v = validate(args.world, tuple(args.scenarios), steps=args.steps)
    v["uptime_start"], v["uptime_end"] = start, uptime()
    print_validate(v)
    write_json(args.json, v)
    print(f"wrote {args.json}")
    return 0

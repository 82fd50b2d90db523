"""Attention/expert disaggregation with the zebra pipeline against non-disaggregated plans, measured on
gloo CPU ranks with component emulation (one rank slower at attention than at experts, like a V100
beside an A40). Prints a table and writes JSON.

    python scripts/bench_zebra.py [--world 2] [--json bench_zebra.json] [--attention-slowdown 3.7]
                                  [--expert-slowdown 1.25] [--rounds 3] [--steps 3]

All plans run in one process group, interleaved in rounds (each round: ``--steps`` timed steps of every
plan), so machine load hits them alike; per plan the median step is reported as tokens/s:

- ``uniform_ep``: even batch shares, experts split evenly, expert parallel (the uniform plan);
- ``ep_*``: uneven shares by attention speed and experts by expert speed (the split that balances each
  phase of a per-layer-synchronized step), with one-sample / one-expert neighbours;
- ``dc_*``: data-centric (every rank computes every expert for its own tokens) with shares by whole-layer
  speed, from the attention/expert cost ratio measured in this run;
- ``zebra``: disaggregated, micro-batches pipelined (``ds_hexamoe.parallel.zebra``), with the split of
  ranks into attention and expert ranks that ``placement.zebra.best_zebra`` simulates fastest from the
  component times calibrated in this run (its ``simulated_step_s`` is in the JSON), experts split by speed;
- ``zebra_asym_ea``: the split and whole-expert placement ``best_zebra`` picks from this run's routing
  counts (HeterMoE's Asym-EA squeezing whole experts onto the attention ranks per layer where the
  simulator finds it faster; ``asym_ea_moves`` says how many moved, 0: the gathered placement won).

The best non-disaggregated plan is the fastest measured ``ep_*``/``dc_*`` plan. Also reachable as
``bench_hetero.py --zebra``.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from bench_common import Col, Laps, Table, uptime, write_json
from ds_hexamoe.apportion import largest_remainder
from ds_hexamoe.testing.zebra import ZebraModel, ZebraModelConfig, make_batch, one_process
from ds_hexamoe.placement.zebra import best_zebra
from ds_hexamoe.testing import run_distributed


def _owners(counts: list[int]) -> list[int]:
    return [r for r, n in enumerate(counts) for _ in range(n)]


def _shift(v: list[int], src: int, dst: int, lo: int) -> list[int] | None:
    """``v`` with one unit moved from ``src`` to ``dst``, or None when ``src`` would drop below ``lo``."""
    if v[src] - 1 < lo:
        return None
    w = list(v)
    w[src] -= 1
    w[dst] += 1
    return w


def candidate_plans(world: int, batch: int, experts: int, fa: list[float], fe: list[float], att_over_exp: float) -> list[dict]:
    """Every plan measured, as ``{name, kind, shares, owner}``; ``fa``/``fe``: per-rank slowdowns."""
    plans = [{"name": "uniform_ep", "kind": "ep", "shares": largest_remainder(batch, [1] * world),
              "owner": _owners(largest_remainder(experts, [1] * world))}]
    # ties (uniform devices): the first rank counts as fast, the last as slow, so the neighbours differ
    fast, slow = min(range(world), key=lambda r: (fa[r], r)), max(range(world), key=lambda r: (fa[r], r))
    shares = largest_remainder(batch, [1 / f for f in fa])
    counts = largest_remainder(experts, [1 / f for f in fe])
    for s in (shares, _shift(shares, slow, fast, 1), _shift(shares, fast, slow, 1)):
        for c in (counts, _shift(counts, slow, fast, 0), _shift(counts, fast, slow, 0)):
            if s is not None and c is not None:
                plans.append({"name": f"ep_{'/'.join(map(str, s))}_e{'/'.join(map(str, c))}", "kind": "ep", "shares": s, "owner": _owners(c)})
    dc = largest_remainder(batch, [1 / (att_over_exp * fa[r] + fe[r]) for r in range(world)])
    for s in (dc, _shift(dc, slow, fast, 1), _shift(dc, fast, slow, 1)):
        if s is not None:
            plans.append({"name": f"dc_{'/'.join(map(str, s))}", "kind": "dc", "shares": s, "owner": None})
    return list({p["name"]: p for p in plans}.values())  # one entry per distinct plan


def routing_counts(c: ZebraModelConfig, batch: int) -> np.ndarray:
    """``[layers, experts]`` pairs routed to each expert by the benchmark's model on its batch."""
    routes: list = []
    with torch.no_grad():
        one_process(ZebraModel(c), make_batch(c, batch)[0], routes)
    return np.stack([np.bincount(idx.reshape(-1).numpy(), minlength=c.experts) for idx in routes]).astype(float)


def calibrate(c: ZebraModelConfig, samples: int, reps: int = 3) -> dict:
    """Forward+backward seconds of one layer's attention segment and expert segment for ``samples`` samples."""
    torch.set_num_threads(1)
    m = ZebraModel(c)
    z = torch.randn(samples, c.seq, c.d, requires_grad=True)
    h, x, i, w = m.attention_segment(0, z)
    xd, wd = x.detach().requires_grad_(), w.detach().requires_grad_()

    def att():
        out = m.attention_segment(0, z)
        (out[0].sum() + out[1].sum() + out[3].sum()).backward()

    def exp():
        m.expert_segment(0, list(range(c.experts)), xd, i, wd).sum().backward()

    out = {}
    for name, f in (("attention_s", att), ("experts_s", exp)):
        f()
        wall = Laps()
        with wall.lap():
            for _ in range(reps):
                f()
        out[name] = wall.last / reps
    return out


def _build(rank, world, plan, c, batch, micro):
    from ds_hexamoe.parallel.zebra import ZebraLayout, ZebraPipeline
    from ds_hexamoe.testing.zebra import ColocatedStep

    model = ZebraModel(c)
    if plan["kind"] == "zebra":
        owner = plan["owner"]
        owner = tuple(map(tuple, owner)) if isinstance(owner[0], list) else tuple(owner)  # per layer (Asym-EA)
        layout = ZebraLayout(tuple(plan["attention"]), tuple(plan["shares"]), owner, micro_batches=micro)
        pipe = ZebraPipeline(model, layout, batch)
        r = layout.rows(rank)
        mine = (r.start, r.stop - r.start) if rank in layout.attention_ranks else None
    else:
        pipe = ColocatedStep(model, plan["shares"], plan["owner"])
        mine = (sum(plan["shares"][:rank]), plan["shares"][rank])
    return model, pipe, mine, torch.optim.SGD(model.parameters(), lr=1e-3)


def _rank(rank, world, plans, cfg, batch, micro, factors, rounds, steps):
    import torch.distributed as dist

    from ds_hexamoe.hetero.slowdown import CollectiveClock

    torch.set_num_threads(1)
    c = ZebraModelConfig(**cfg)
    x, t = make_batch(c, batch)
    built = [_build(rank, world, p, c, batch, micro) for p in plans]
    clock = CollectiveClock(*factors[rank]).install()
    times: list[list[float]] = [[] for _ in plans]
    laps = [{"busy_s": 0.0, "comm_s": 0.0, "slept_s": 0.0} for _ in plans]
    try:
        for rnd in range(rounds + 1):  # round 0 warms up
            for i, (model, pipe, mine, opt) in enumerate(built):
                walls = Laps()
                for _ in range(steps):
                    opt.zero_grad(set_to_none=False)
                    dist.barrier()
                    with walls.lap(keep=rnd > 0):
                        pipe.step(x[mine[0]:mine[0] + mine[1]], t[mine[0]:mine[0] + mine[1]]) if mine else pipe.step()
                        opt.step()
                        dist.barrier()
                times[i] += walls.s
                lap = clock.lap()
                for k in laps[i]:
                    laps[i][k] += lap[k] / steps / rounds if rnd else 0.0
    finally:
        clock.uninstall()
    return times, laps


def run(world: int, fa: float, fe: float, rounds: int, steps: int, batch: int, micro: int, cfg: dict,
        base: float = 1.0) -> dict:
    load = uptime()
    c = ZebraModelConfig(**cfg)
    cal = calibrate(c, batch // micro)
    slow = [world - 1]
    fas = [fa if r in slow else 1.0 for r in range(world)]
    fes = [fe if r in slow else 1.0 for r in range(world)]
    plans = candidate_plans(world, batch, c.experts, fas, fes, cal["attention_s"] / cal["experts_s"])
    # the split placement/zebra.py's simulator picks from this run's calibration (per sample and layer)
    per = batch // micro
    att = [cal["attention_s"] / per * fas[r] for r in range(world)]
    exp = [cal["experts_s"] / per * fes[r] for r in range(world)]
    est = best_zebra(att, exp, batch, c.layers, micro)
    counts = largest_remainder(c.experts, est.expert_fraction)
    zebra = {"name": "zebra", "kind": "zebra", "attention": est.attention, "shares": est.shares,
             "owner": [est.experts[i] for i in _owners(counts)], "simulated_step_s": est.step_time}
    asym = best_zebra(att, exp, batch, c.layers, micro, loads=routing_counts(c, batch))
    plans += [zebra, {"name": "zebra_asym_ea", "kind": "zebra", "attention": asym.attention, "shares": asym.shares,
                      "owner": asym.owner, "simulated_step_s": asym.step_time, "asym_ea_moves": asym.asym_ea_moves,
                      "simulated_gathered_step_s": asym.gathered_step_time}]
    memory = param_bytes_per_rank(c, zebra, batch, micro)
    # ``base`` slows every rank alike: most of each step becomes emulated sleep, so ranks computing at the
    # same time compete less for a loaded machine's cores (the ratios between ranks are unchanged)
    out = run_distributed(_rank, world, plans, cfg, batch, micro, [(base * fas[r], base * fes[r]) for r in range(world)],
                          rounds, steps, timeout=1800)
    times = out[0][0]
    tokens = batch * c.seq
    rows = []
    for i, (p, ts) in enumerate(zip(plans, times)):
        med = statistics.median(ts)
        # per rank, mean per step: busy (work, emulated extra included), comm (in collectives), slept (emulated)
        per_rank = [{k: round(v, 4) for k, v in o[1][i].items()} for o in out]
        rows.append(p | {"median_step_s": med, "tokens_per_s": tokens / med, "steps_s": ts, "clock_per_rank": per_rank})
    by = {r["name"]: r for r in rows}
    best = max((r for r in rows if r["kind"] != "zebra"), key=lambda r: r["tokens_per_s"])
    z, u = by["zebra"]["tokens_per_s"], by["uniform_ep"]["tokens_per_s"]
    a = by["zebra_asym_ea"]["tokens_per_s"]
    top = max(z, a)
    return {
        "uptime_start": load, "world": world, "slow_ranks": slow, "attention_slowdown": fa, "expert_slowdown": fe,
        "model": cfg, "global_batch": batch, "micro_batches": micro, "tokens_per_step": tokens,
        "calibration_one_micro_batch": cal, "plans": rows,
        "zebra_tokens_per_s": z, "best_plan": best["name"], "best_plan_tokens_per_s": best["tokens_per_s"],
        "uniform_ep_tokens_per_s": u, "base_slowdown": base, "zebra_over_best_plan": z / best["tokens_per_s"], "zebra_over_uniform_ep": z / u,
        "asym_ea_tokens_per_s": a, "asym_ea_moves": by["zebra_asym_ea"]["asym_ea_moves"],
        "asym_ea_over_best_plan": a / best["tokens_per_s"],
        "goal_zebra_over_best_plan": 1.2, "goal_met": top / best["tokens_per_s"] >= 1.2,
        "param_bytes_per_rank": memory, "uptime_end": uptime(),
        # an upper bound, not a measurement: zebra's step if no rank ever waited (its busiest rank's busy time),
        # what pipeline bubbles and waits cost beside the measured ratio
        "zebra_no_bubble_bound_over_best_plan": {
            n: best["median_step_s"] / max(x["busy_s"] for x in by[n]["clock_per_rank"])
            for n in ("zebra", "zebra_asym_ea")},
    }


def param_bytes_per_rank(c: ZebraModelConfig, zebra: dict, batch: int, micro: int) -> dict:
    """Parameter bytes each rank holds under the zebra split (``parallel.zebra_parts.owned_bytes``) and in the
    colocated replicated run (the whole model on every rank); AdamW adds 8 bytes per fp32 parameter."""
    from ds_hexamoe.parallel.zebra import ZebraLayout
    from ds_hexamoe.parallel.zebra_parts import owned_bytes

    model = ZebraModel(c)
    layout = ZebraLayout(tuple(zebra["attention"]), tuple(zebra["shares"]), tuple(zebra["owner"]), micro_batches=micro)
    world = len(zebra["attention"]) + len(layout.expert_ranks)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    zebra_bytes = [owned_bytes(model, layout, r) for r in range(world)]
    return {"zebra": zebra_bytes, "colocated_replicated": [full] * world,
            "adamw_optimizer_bytes": {"zebra": [2 * b for b in zebra_bytes], "colocated_replicated": [2 * full] * world},
            "roles": ["attention" if r in layout.attention_ranks else "experts" for r in range(world)]}


def print_table(res: dict) -> None:
    print(f"uptime at start: {res['uptime_start']}")
    print(f"world {res['world']}, slow ranks {res['slow_ranks']}: attention x{res['attention_slowdown']}, "
          f"experts x{res['expert_slowdown']}; every rank x{res['base_slowdown']}; {res['tokens_per_step']} tokens/step")
    t = Table(Col("plan", "<22"), Col("shares", "<12", sep=" "), Col("median s", ">9.3f", sep=" "),
              Col("tokens/s", ">10.0f", sep=" "), Col("vs uniform", ">9.2f", "x", sep=" "),
              Col("busy s per rank", sep="  "))
    print(t.header())
    u = res["uniform_ep_tokens_per_s"]
    for r in res["plans"]:
        busy = " ".join(f"{x['busy_s']:.3f}" for x in r["clock_per_rank"])
        print(t.row(r["name"], "/".join(map(str, r["shares"])), r["median_step_s"], r["tokens_per_s"],
                    r["tokens_per_s"] / u, busy))
    print(f"zebra / best non-disaggregated ({res['best_plan']}): {res['zebra_over_best_plan']:.2f}x, zebra + Asym-EA "
          f"({res['asym_ea_moves']} experts moved): {res['asym_ea_over_best_plan']:.2f}x (goal >= 1.2x for the better: "
          f"{'met' if res['goal_met'] else 'not met'}); zebra / uniform EP: {res['zebra_over_uniform_ep']:.2f}x")
    bound = res["zebra_no_bubble_bound_over_best_plan"]
    print(f"upper bound, no pipeline bubble (busiest zebra rank's busy time as the step): zebra {bound['zebra']:.2f}x, "
          f"+ Asym-EA {bound['zebra_asym_ea']:.2f}x the best non-disaggregated plan")
    mem = res["param_bytes_per_rank"]
    print("parameter bytes per rank, zebra (" + ", ".join(mem["roles"]) + "): "
          + " ".join(map(str, mem["zebra"])) + f"; colocated replicated: {mem['colocated_replicated'][0]} each")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, choices=(2, 3))
    ap.add_argument("--json", default="bench_zebra.json")
    ap.add_argument("--attention-slowdown", type=float, default=3.7)
    ap.add_argument("--expert-slowdown", type=float, default=1.25)
    ap.add_argument("--base-slowdown", type=float, default=1.0,
                    help="slow every rank by this factor too (>= 1), leaving each rank's cores mostly idle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="global batch in samples")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args(argv)
    cfg = {"layers": a.layers, "d": a.d, "heads": 4, "seq": a.seq, "experts": a.experts, "ffn": a.ffn, "top_k": 2}
    if not a.base_slowdown >= 1.0:
        ap.error(f"--base-slowdown: got {a.base_slowdown}; expected a number >= 1")
    res = run(a.world, a.attention_slowdown, a.expert_slowdown, a.rounds, a.steps, a.batch, a.micro_batches, cfg,
              a.base_slowdown)
    print_table(res)
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()

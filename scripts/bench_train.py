#!/usr/bin/env python
"""Training throughput of a Mixtral-style MoE on CPU gloo ranks: FSSDP against the alternatives.

Contenders (each in its own set of spawned ranks, same model weights, data and optimizer):
  fssdp            dense under ZeRO-2, experts fully sharded by FSSDP, Hecate's schedule (predicted gathers)
  fssdp_sync       the same with the synchronous schedule (gather after the router)
  fssdp_keep       fssdp without re-materialization (gathered experts kept for backward)
  expert_parallel  ds-hexamoe's expert-parallel mode (experts hosted on their FSSDP owners, token all-to-all)
  hecate           the "hecate" mode: expert parallel with a placement decided every iteration from the load
                   window (hot experts copied to every rank), gathered ahead, tokens dispatched local first
  autoep           DeepSpeed AutoEP; it needs transformers 5.17.0, so it runs in a side virtual environment
                   (built on first use: ~/.cache/ds-hexamoe/autoep-venv, from the base interpreter with its
                   packages and, when the bench runs in a venv, that venv's packages through a .pth file)
  zero3_leaf       ZeRO-3 with the MoE block as a leaf module (deepspeed.utils.set_z3_leaf_modules)
  zero2            ZeRO-2, every rank holds every expert

Per contender: tokens_per_s, exposed_comm_s (per step: seconds the training thread blocked in FSSDP's
collectives; measured for the FSSDP-managed contenders only, whose token all-to-alls in expert-parallel
mode and DeepSpeed's dense collectives are not included), bytes_per_step (DeepSpeed's comms logger plus
FSSDP's payload), expert_state_bytes_per_rank (expert parameters, gradients and optimizer state held per
rank: measured for FSSDP, from the parameter count for the others), peak_expert_cache_bytes (FSSDP's
materialized experts), straggler (the slowest rank's MoE time over the ranks' mean: CPU seconds of the
training thread in the MoE blocks' forward, waits in collectives excluded). ``--routing skewed`` biases every router toward a few experts through the weights
(so every contender sees the same skew); ``natural`` keeps the random router; ``drift`` is ``skewed`` with
the hot set moving: every 2 steps the router's choices shift by one expert (a hook on Hugging Face's
router, so AutoEP, which replaces the MoE block, sees the static skew only). Prints a table of ratios to
``fssdp`` and writes JSON with ``uptime`` at the start. Timings compare only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

from bench_common import Col, Laps, Table, uptime, write_json
from side_env import side_env

PRESETS = {"hecate": dict(hidden=256, ffn=512, experts=16, top_k=2, layers=4, seq=256, batch=2, vocab=1024,
                          steps=4, warmup=2)}
CONTENDERS = ("hecate", "fssdp", "fssdp_sync", "expert_parallel", "autoep", "zero3_leaf")
STEP = {"i": 0}  # the step being run: --routing drift reads it
VENV = os.path.expanduser("~/.cache/ds-hexamoe/autoep-venv")
AUTOEP_TRANSFORMERS = "5.17.0"


def _model(args, impl: str):
    from transformers import AutoModelForCausalLM, MixtralConfig

    if impl == "hexamoe":
        import ds_hexamoe  # noqa: F401  (registers the implementation)
    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=max(64, args.seq), num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k, router_jitter_noise=0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).float()
    if args.routing in ("skewed", "drift"):
        _skew(model, args)
    if args.routing == "drift":
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(_drift)
    return model


def _drift(module, args, out):
    """Shift every routing choice by ``step // 2`` experts (the logits rolled alike; the top-k scores stay
    with their choices)."""
    if not (isinstance(out, tuple) and len(out) == 3):
        return out
    logits, scores, index = out
    shift = STEP["i"] // 2
    n = logits.size(-1)
    return torch.roll(logits, shift, -1), scores, torch.remainder(index + shift, n)


@torch.no_grad()
def _skew(model, args) -> None:
    """A common direction ``u`` added to every token embedding, and router rows leaning toward ``u`` with
    geometrically falling strength: expert 0 gets the most tokens, then 1, ... (in the weights, so any
    implementation routes alike)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(args.hidden, generator=g)
    u /= u.norm()
    emb = model.get_input_embeddings().weight
    emb += 4.0 * emb.std() * u
    for layer in model.model.layers:
        w = layer.mlp.gate.weight
        strength = torch.tensor([0.7 ** e for e in range(w.size(0))]) * 3.0 * w.norm(dim=1).mean()
        w += strength[:, None] * u[None, :]


def _ds_config(args, mode: str) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": 3 if mode == "zero3_leaf" else 2},
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True},
    }
    if mode == "autoep":
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": args.world, "preset_model": "mixtral"}
    return cfg


def _ds_log():
    from deepspeed.comm import comm

    return getattr(comm, "comms_logger", None)


def _ds_totals() -> tuple[int, float]:
    """(bytes, seconds) DeepSpeed's comms logger recorded since the last reset."""
    log = _ds_log()
    if log is None:
        return 0, 0.0
    recs = [rec for op in log.comms_dict.values() for rec in op.items()]
    return (int(sum(size * rec[0] for size, rec in recs)), sum(sum(rec[1]) for _, rec in recs) / 1e3)


def _build(args, mode: str, model, ds):
    import deepspeed

    manager = None
    if mode.startswith("fssdp") or mode in ("expert_parallel", "hecate"):
        from ds_hexamoe.config import HexaMoEConfig
        from ds_hexamoe.fssdp import FSSDPManager

        hx = {"sharding": "fssdp", "rematerialize": mode != "fssdp_keep", "prefetch": True,
              "fssdp": {"schedule": "sync" if mode == "fssdp_sync" else "hecate", "reshard_every": 0}}
        if mode in ("expert_parallel", "hecate"):
            hx["mode"] = mode
        manager = FSSDPManager.shard_model(model, HexaMoEConfig.from_dict(hx))
        params = [p for p in model.parameters() if not manager.owns(p)]
    else:
        params = list(model.parameters())
        if mode == "zero3_leaf":
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    if manager is not None:
        manager.attach(engine, optimizer_config=ds["optimizer"])
    return engine, manager


class _MoETimer:
    """CPU seconds of the training thread inside the MoE blocks' forward (``time.thread_time``: a wait in a
    collective is not work, so a rank kept waiting by a slow one does not count the wait)."""

    def __init__(self, model):
        self.seconds, self._t0 = 0.0, {}
        for layer in model.model.layers:  # AutoEP's block too: it replaces ``mlp`` in place
            layer.mlp.register_forward_pre_hook(self._start)
            layer.mlp.register_forward_hook(self._stop)

    def _start(self, module, args) -> None:
        self._t0[id(module)] = time.thread_time()

    def _stop(self, module, args, out) -> None:
        self.seconds += time.thread_time() - self._t0.pop(id(module))


def _expert_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or ".experts" in n.rsplit(".", 1)[0])


def _worker(rank: int, world: int, mode: str, args) -> dict:
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed("gloo")
    model = _model(args, "eager" if mode == "autoep" else "hexamoe")
    expert_numel = _expert_numel(model)
    try:
        engine, manager = _build(args, mode, model, _ds_config(args, mode))
    except Exception as e:
        return {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    moe = _MoETimer(engine.module)
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.warmup + args.steps)]
    fssdp_bytes = fssdp_exposed = 0.0
    exposed_by: dict[str, float] = {}
    sched = {"calibrations": 0, "loads_deferred": 0}  # per measured step, summed
    for i, x in enumerate(data):
        STEP["i"] = i
        if i == args.warmup:
            log = _ds_log()
            if log is not None:
                log.comms_dict.clear()
            moe.seconds = 0.0
            torch.distributed.barrier()
            t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if i >= args.warmup and manager is not None:
            c = manager.last_step_comm_stats()
            fssdp_bytes += c["total"]
            fssdp_exposed += c["exposed_comm_s"]
            for k, v in c["exposed_by"].items():
                exposed_by[k] = exposed_by.get(k, 0.0) + v / args.steps
            for k in sched:
                sched[k] += c[k]
    torch.distributed.barrier()
    dt = time.perf_counter() - t0
    ds_bytes, ds_s = _ds_totals()
    n = args.steps
    out = {"mode": mode, "tokens_per_s": n * args.batch * args.seq / dt, "step_s": dt / n,
           "bytes_per_step": (ds_bytes + fssdp_bytes) / n, "ds_logger_comm_s": ds_s / n, "loss": float(loss.detach()),
           # FSSDP's own blocked time; DeepSpeed's logger latencies exceed the step time on gloo: not comparable
           "exposed_comm_s": fssdp_exposed / n if manager is not None else None, "exposed_by": exposed_by,
           "moe_cpu_s": moe.seconds / n}
    if manager is not None:  # layer calls per step whose loads were exchanged off the critical path, calibrations
        out.update({k: v / n for k, v in sched.items()})
    # fp32 parameter + gradient + two Adam moments per expert element, unless measured
    if manager is not None:
        mem = manager.memory_stats()
        out["expert_state_bytes_per_rank"] = mem["expert_state_bytes"]
        out["peak_expert_cache_bytes"] = mem["cache_bytes"]
        calls = [c for loads in manager.load_history().values() for c in loads]
        tok = [sum(c[q][e] for c in calls for q in range(world)) for e in range(args.experts)]
        out["routing_max_over_mean"] = max(tok) / max(1e-9, sum(tok) / len(tok))
    elif mode == "zero2":
        out["expert_state_bytes_per_rank"] = expert_numel * 4 * (1 + 3 / world)  # replica + partitioned grads/moments
    else:  # zero3_leaf partitions everything; AutoEP holds E/world experts, their optimizer state unsharded
        out["expert_state_bytes_per_rank"] = expert_numel * 16 / world
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, mode, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        queue.put((rank, _worker(rank, world, mode, args)))
    except Exception as e:  # a rank that dies reports why
        queue.put((rank, {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}))


def _launch(mode: str, args) -> list[dict]:
    """Run ``mode`` on ``args.world`` spawned ranks; every rank's result (or error)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, args.world, port, mode, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + args.timeout
    try:
        while len(got) < args.world and time.monotonic() < deadline:
            try:
                r, res = queue.get(timeout=5)
                got[r] = res
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got.get(r, {"mode": mode, "error": "rank died or timed out"}) for r in range(args.world)]


def _venv_python() -> str:
    """The side environment's python with transformers 5.17.0 (built on first use)."""
    py = side_env(VENV)
    probe = [py, "-c", "import torch, transformers; print(transformers.__version__)"]
    if subprocess.run(probe, capture_output=True, text=True).stdout.strip() != AUTOEP_TRANSFORMERS:
        subprocess.run([py, "-m", "pip", "install", "-q", f"transformers=={AUTOEP_TRANSFORMERS}"], check=True)
    return py


def _run_autoep(args) -> list[dict]:
    """AutoEP in the side environment: this script again, for that one contender."""
    try:
        py = _venv_python()
    except Exception as e:
        return [{"mode": "autoep", "error": f"side environment: {type(e).__name__}: {e}"}]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "autoep.json")
        cmd = [py, os.path.abspath(__file__), "--child", "--modes", "autoep", "--json", out]
        for k in ("world", "hidden", "ffn", "experts", "top_k", "layers", "vocab", "seq", "batch", "steps", "warmup",
                  "routing", "timeout"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 120)
        if not os.path.exists(out):
            return [{"mode": "autoep", "error": f"child exited {proc.returncode}: {proc.stderr[-300:]}"}]
        with open(out) as fh:
            return json.load(fh)["raw"]["autoep"]["ranks"]


def _table(results: dict) -> list[dict]:
    metrics = ("tokens_per_s", "exposed_comm_s", "bytes_per_step", "expert_state_bytes_per_rank")

    def avg(ranks, key):
        vals = [r[key] for r in ranks if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    base = results.get("fssdp", {}).get("ranks") or []
    rows = []
    for mode, res in results.items():
        moe = [r["moe_cpu_s"] for r in res["ranks"] if r.get("moe_cpu_s")]
        # the slowest rank's MoE time over the mean (1.0: balanced)
        row = {"mode": mode, "error": res["error"], "straggler": max(moe) / (sum(moe) / len(moe)) if moe else None}
        for m in metrics:
            v, b = avg(res["ranks"], m), avg(base, m)
            row[m], row[f"{m}_vs_fssdp"] = v, ((v / b) if (v is not None and b) else None)
        rows.append(row)
    return rows


def _print(rows: list[dict]) -> None:
    t = Table(Col("contender", "<16"), Col("tokens/s", ">10.1f"), Col("x", ">7.2f"), Col("exposed s", ">11.4f"),
              Col("x", ">7.2f"), Col("bytes/step", ">13.0f"), Col("x", ">7.2f"), Col("expert B/rank", ">15.0f"),
              Col("x", ">7.2f"), Col("straggler", ">10.2f"), Col("note", sep="  "))
    print(t.header())
    for r in rows:
        print(t.row(r["mode"], r["tokens_per_s"], r["tokens_per_s_vs_fssdp"], r["exposed_comm_s"],
                    r["exposed_comm_s_vs_fssdp"], r["bytes_per_step"], r["bytes_per_step_vs_fssdp"],
                    r["expert_state_bytes_per_rank"], r["expert_state_bytes_per_rank_vs_fssdp"], r["straggler"],
                    r["error"] or ""))
    print("x: ratio to fssdp (tokens/s above 1 is faster; the others above 1 are more); straggler: the slowest "
          "rank's CPU seconds in the MoE blocks' forward over the ranks' mean")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and step counts (flags override)")
    p.add_argument("--routing", choices=("natural", "skewed", "drift"), default="natural")
    p.add_argument("--modes", default=",".join(CONTENDERS))
    p.add_argument("--world", type=int, default=2)
    for k, v in dict(hidden=64, ffn=128, experts=8, top_k=2, layers=2, vocab=128, seq=32, batch=4, steps=10,
                     warmup=2).items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {v}")
    p.add_argument("--json", default="bench_train.json")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = dict(hidden=64, ffn=128, experts=8, top_k=2, layers=2, vocab=128, seq=32, batch=4, steps=10, warmup=2)
    base.update(PRESETS.get(args.preset, {}))
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    load = uptime()
    print(f"uptime at start: {load}")
    results = {}
    for mode in args.modes.split(","):
        wall = Laps()
        with wall.lap():
            ranks = _run_autoep(args) if (mode == "autoep" and not args.child) else _launch(mode, args)
        results[mode] = {"ranks": ranks, "error": next((r["error"] for r in ranks if "error" in r), None),
                         "wall_s": wall.last}
        print(f"  {mode}: {results[mode]['wall_s']:.0f}s {results[mode]['error'] or 'ok'}", flush=True)
    rows = _table(results)
    _print(rows)
    write_json(args.json, {"uptime": load, "args": vars(args), "contenders": {r["mode"]: r for r in rows},
                           "raw": results}, default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plans for people: a log summary (:func:`report`), a terminal table (:func:`print_table`) and a chart
of per-rank busy and idle time beside the uniform plan (:func:`save_png`)."""
from __future__ import annotations

import sys

import numpy as np

from .plan import Plan


def report(plan: Plan, max_ranks: int = 16) -> str:
    """A plain-text summary of a plan for training logs."""
    p = plan.predicted
    lines = [f"hexamoe plan: {plan.world_size} ranks, global batch {plan.global_batch}, solver {plan.solver}, "
             f"modes {_mode_summary(plan)}"]
    if p:
        lines.append(f"  predicted step {p['step_time']:.4g} s (collectives {p.get('sync_time', 0.0):.3g} s); "
                     f"uniform {p['uniform_step_time']:.4g} s "
                     f"(x{p['speedup_vs_uniform']:.2f}); ideal {p['ideal_step_time']:.4g} s "
                     f"({100 * p['efficiency_vs_ideal']:.0f}% of ideal)")
    per = p.get("per_rank", {}) if p else {}
    for r in range(min(plan.world_size, max_ranks)):
        hosted = np.mean([sum(r in ranks for ranks in plan.placement[l].values()) for l in plan.layers])
        extra = (f" busy {per['busy'][r]:.4g} s idle {per['idle'][r]:.4g} s mem {per['memory_gb'][r]:.1f}/"
                 f"{per['memory_limit_gb'][r]:.1f} GB") if per else ""
        lines.append(f"  rank {r:>3} {plan.devices[r]:<12} batch {plan.batch_shares[r]:>4} shard "
                     f"{100 * plan.shard_weights[r]:5.1f}% experts/layer {hosted:5.2f}{extra}")
    if plan.world_size > max_ranks:
        lines.append(f"  ... {plan.world_size - max_ranks} more ranks")
    return "\n".join(lines)


def _mode_summary(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for m in plan.modes.values():
        counts[m] = counts.get(m, 0) + 1
    return ", ".join(f"{m} x{n}" for m, n in counts.items())


def print_table(plan: Plan, max_ranks: int = 64) -> None:
    from rich.console import Console
    from rich.table import Table

    p = plan.predicted
    per = p["per_rank"]
    t = Table(title=f"hexamoe plan ({plan.solver}; {_mode_summary(plan)})")
    for col in ("rank", "device", "batch", "shard %", "experts/layer", "dense s", "moe s", "busy s", "idle s",
                "memory GB"):
        t.add_column(col, justify="right")
    for r in range(min(plan.world_size, max_ranks)):
        hosted = np.mean([sum(r in ranks for ranks in plan.placement[l].values()) for l in plan.layers])
        t.add_row(str(r), plan.devices[r], str(plan.batch_shares[r]), f"{100 * plan.shard_weights[r]:.1f}",
                  f"{hosted:.2f}", f"{per['dense'][r]:.4g}", f"{per['moe'][r]:.4g}", f"{per['busy'][r]:.4g}",
                  f"{per['idle'][r]:.4g}", f"{per['memory_gb'][r]:.1f}/{per['memory_limit_gb'][r]:.1f}")
    c = Console(width=None if sys.stdout.isatty() else 160)
    c.print(t)
    if plan.world_size > max_ranks:
        c.print(f"... {plan.world_size - max_ranks} more ranks (all in the JSON)")
    s = Table(title="predicted step time")
    for col in ("plan", "step s", "vs plan"):
        s.add_column(col, justify="right")
    s.add_row(f"this plan (collectives {p.get('sync_time', 0.0):.3g} s)", f"{p['step_time']:.4g}", "1.00")
    s.add_row("uniform" + ("" if p["uniform_memory_ok"] else " (over memory)"), f"{p['uniform_step_time']:.4g}",
              f"{p['uniform_step_time'] / p['step_time']:.2f}")
    s.add_row("ideal (work / speed)", f"{p['ideal_step_time']:.4g}", f"{p['ideal_step_time'] / p['step_time']:.2f}")
    if "sum_bound_step_time" in p:  # what the plan would take if no rank waited for another inside a step
        s.add_row("this plan, no waiting at layers", f"{p['sum_bound_step_time']:.4g}",
                  f"{p['sum_bound_step_time'] / p['step_time']:.2f}")
    c.print(s)
    cands = plan.meta.get("candidates", {})
    if cands:
        c.print("candidates: " + ", ".join(f"{n} {v:.4g} s" for n, v in cands.items())
                + f"; chose {plan.meta.get('candidate')}; solver status: {plan.meta.get('solver_status')}")
    z = plan.meta.get("zebra")
    if z:
        c.print(f"zebra (attention and expert ranks apart): {z['step_time']:.4g} s with {len(z['attention_ranks'])} "
                f"attention ranks, {z['micro_batches']} micro-batches ({'faster' if z['wins'] else 'not faster'} "
                f"than this plan); split search: {z.get('split_search', 'all splits')}", soft_wrap=True)


def save_png(plan: Plan, path: str) -> None:
    """Per-rank busy time (dense + MoE) and idle time, this plan beside the uniform one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = plan.predicted
    R = plan.world_size
    x = np.arange(R)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.35 * R + 4), 4), sharey=True)
    ax = axes[0]
    ax.bar(x, p["per_rank"]["dense"], label="dense", color="#4c72b0")
    ax.bar(x, p["per_rank"]["moe"], bottom=p["per_rank"]["dense"], label="MoE", color="#dd8452")
    ax.bar(x, p["per_rank"]["idle"], bottom=p["per_rank"]["busy"], label="idle", color="#dddddd", hatch="//")
    ax.set_title(f"plan ({plan.solver}): {p['step_time']:.3g} s")
    ax.set_xlabel("rank")
    ax.set_ylabel("seconds per step")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(x, p["uniform_per_rank"]["busy"], color="#8c8c8c", label="busy")
    ax.bar(x, p["uniform_per_rank"]["idle"], bottom=p["uniform_per_rank"]["busy"], color="#dddddd", hatch="//",
           label="idle")
    ax.axhline(p["ideal_step_time"], color="k", ls="--", lw=1, label="ideal")
    ax.set_title(f"uniform: {p['uniform_step_time']:.3g} s")
    ax.set_xlabel("rank")
    ax.legend(fontsize=8)
    labels = [d[:10] for d in plan.devices] if R <= 32 else None
    for a in axes:
        if labels:
            a.set_xticks(x, labels, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_COLORS = {"dense": "#4c72b0", "experts": "#dd8452", "optimizer": "#8172b3", "wait": "#eeeeee",
           "dispatch": "#55a868", "combine": "#2ca02c", "gather": "#c44e52", "all_gather": "#55a868",
           "reduce_scatter": "#2ca02c", "materialize": "#937860", "prefetch": "#da8bc3"}


def save_timeline(plan: Plan, timeline: list[dict], path: str, max_ranks: int = 32) -> None:
    """A Gantt chart of one simulated step (``simulate(plan, cost, timeline=True).timeline``): per rank a
    compute lane (dense, experts, optimizer, waiting for peers) and a communication lane below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    R = min(plan.world_size, max_ranks)
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.55 * R + 1.5)))
    seen = set()
    for ev in timeline:
        if ev["rank"] >= R:
            continue
        y = ev["rank"] * 2 + (1 if ev["stream"] == "comm" else 0)
        ax.barh(y, ev["end"] - ev["start"], left=ev["start"], height=0.8, color=_COLORS.get(ev["label"], "#999999"),
                edgecolor="none")
        seen.add(ev["label"])
    ax.set_yticks([2 * r + s for r in range(R) for s in (0, 1)],
                  [f"{r} {plan.devices[r][:10]} {'comm' if s else 'compute'}" for r in range(R) for s in (0, 1)],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds into the step")
    title = f"simulated step ({plan.solver}; {_mode_summary(plan)})"
    ax.set_title(title + (f", first {R} of {plan.world_size} ranks" if R < plan.world_size else ""))
    ax.legend(handles=[Patch(color=_COLORS.get(k, "#999999"), label=k) for k in sorted(seen)], fontsize=7,
              loc="upper right", ncol=min(len(seen), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

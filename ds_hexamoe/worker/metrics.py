"""What the worker reports: ``metrics.jsonl`` rows, the progress bar's figures, and the expert-load
balance when the engine's runtime reports none (docs/design.md, "Recipes, tasks, worker and CLI")."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..distributed import dist_on
from ..experts import RoutingStatsCollector, experts_modules, reduce_stats

METRICS_FILE = "metrics.jsonl"


class ExpertLoadTracker:
    """Tokens per expert of every experts module since the last :meth:`balance`, for the balance figure
    when the engine's runtime reports none.

    Counting is the package's one :class:`~ds_hexamoe.experts.RoutingStatsCollector` (no affinity), fed
    by forward hooks with the routing each module receives: it works whatever the experts implementation,
    and a layer run again in backward (activation checkpointing) counts once per forward of the model."""

    def __init__(self, model: torch.nn.Module, device=None):
        del device  # kept for callers: reduce_stats puts the counts where the process group needs them
        self.collector = RoutingStatsCollector(affinity=False)
        self.handles = [model.register_forward_pre_hook(lambda _m, _a: self.collector.step())]
        for name, m in experts_modules(model):
            n = getattr(m, "num_experts", None)
            if n is None:
                continue
            self.handles.append(m.register_forward_hook(self._hook(name, int(n))))

    def _hook(self, name: str, n: int):
        def hook(module, args, output):
            if len(args) >= 2 and torch.is_tensor(args[1]):
                idx = args[1]
                self.collector.record(name, idx.reshape(-1, idx.size(-1)) if idx.dim() > 2 else idx, n)

        return hook

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """Tokens per expert of each layer so far (this rank)."""
        snap = self.collector.snapshot()
        return {l: torch.tensor(snap.counts[l]) for l in snap.layers}

    def balance(self) -> float | None:
        """The package's balance figure (:func:`ds_hexamoe.experts.balance`) of the tokens routed on all
        ranks since the last call."""
        snap = self.collector.snapshot()
        if not snap.layers:
            return None
        self.collector.reset()
        return float(reduce_stats(snap).balance()["overall"])


def runtime_metrics(engine) -> dict:
    """``engine.hexamoe.metrics()`` (balance, comm bytes, dropped tokens), or ``{}`` without a runtime."""
    rt = getattr(engine, "hexamoe", None)
    fn = getattr(rt, "metrics", None)
    if not callable(fn):
        return {}
    try:
        return dict(fn())
    except Exception as e:  # metrics must never stop training
        logging.getLogger(__name__).warning("engine.hexamoe.metrics() failed: %s", e)
        return {}


def all_sum(values: list[float | torch.Tensor], device) -> list[float]:
    """Sums over ranks (one collective; on the engine's device, as NCCL needs)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if dist_on():
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class Window:
    """Step losses and units (tokens, images) since the last metrics row."""

    losses: list[float] = field(default_factory=list)
    units: float = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, units: float) -> None:
        self.losses.append(loss)
        self.units += units

    def reset(self) -> None:
        self.losses, self.units, self.t0 = [], 0, time.perf_counter()


def metrics_row(step: int, loss: float, aux_loss: float, lr: float | None, window: Window, elapsed: float, unit: str,
                balance_figure: float | None, rtm: dict, elapsed_s: float) -> dict:
    """One ``metrics.jsonl`` row (keys in the order the file has always had)."""
    rec = {"step": step, "loss": loss, "loss_mean": sum(window.losses) / len(window.losses), "lr": lr,
           f"{unit}_per_s": window.units / max(elapsed, 1e-9), "balance": balance_figure,
           "comm_bytes": rtm.get("comm_bytes"), "elapsed_s": elapsed_s}
    if math.isfinite(aux_loss):
        rec["aux_loss"] = aux_loss
    for key in ("dropped_tokens",):
        if key in rtm:
            rec[key] = rtm[key]
    exposed = (rtm.get("comm") or {}).get("exposed_comm_s")
    if exposed is not None:  # FSSDP: seconds the last step blocked on its collectives (docs/fssdp.md)
        rec["exposed_comm_s"] = exposed
    return rec


def append_row(path: str, rec: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def progress_postfix(rec: dict, unit: str) -> dict:
    """The progress bar's figures of a metrics row."""
    post = {"loss": f"{rec['loss']:.4f}", unit + "/s": f"{rec[unit + '_per_s']:.0f}"}
    post["bal"] = "n/a" if rec["balance"] is None else f"{rec['balance']:.2f}"
    post["comm"] = "n/a" if rec["comm_bytes"] is None else _fmt_bytes(rec["comm_bytes"])
    if rec.get("exposed_comm_s") is not None:
        post["xcomm"] = f"{rec['exposed_comm_s'] * 1e3:.0f}ms"
    if rec.get("val_loss") is not None:
        post["val"] = f"{rec['val_loss']:.4f}"
    for key, value in rec.items():  # a task's metric beside the loss (val_accuracy -> "accuracy")
        if key.startswith("val_") and key != "val_loss" and value is not None:
            post[key[4:]] = f"{value:.4f}"
    return post


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)

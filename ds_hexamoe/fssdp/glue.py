"""Optimizer, accounting and checkpoint glue of FSSDPManager: what a training step reads and drives.

Counters reset at each optimizer step; ``last_step_*`` report the step before (docs/design.md, "FSSDP").
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import CommStats, blocked
from .optim import ShardedOptimizer


class GlueMixin:
    """FSSDPManager's statistics, gradient norms, sharded optimizer, engine attachment and full export."""

    def accounting_summary(self, last_step: bool = True) -> dict:
        """Token accounting and bytes per collective of the expert-parallel / model-centric layers, with the
        FSSDP weight traffic beside them (``last_step``: the last completed optimizer step, else the current)."""
        from ..parallel.accounting import TokenAccounting

        calls = self._last_step_calls if last_step else list(self.accounting.calls)
        acc = TokenAccounting(history=max(1, len(calls)))
        acc.calls.extend(calls)
        s = acc.summary()
        comm = self.last_step_stats if last_step else self.stats
        weight = comm.total_bytes
        per_layer: dict[str, dict] = {}
        for c in calls:
            name = self.layers[c.layer].name if c.layer is not None and c.layer < len(self.layers) else str(c.layer)
            d = per_layer.setdefault(name, {"mode": c.mode, "calls": 0, "tokens": 0, "rows_computed": 0, "bytes_sent": 0})
            d["calls"] += 1
            d["tokens"] += c.tokens
            d["rows_computed"] += c.rows_computed
            d["bytes_sent"] += c.bytes_sent()
        out = {
            "modes": self.modes(),
            "replicated_experts": {layer.name: sum(len(r) - 1 for r in self._placements[layer.index].values())
                                   for layer in self.layers if layer.index in self._placements},
            "calls": s["calls"], "tokens": s["tokens"], "dropped_tokens": s["dropped_tokens"],
            "token_bytes": s["bytes_sent"], "bytes_by_collective": s["bytes_by_collective"],
            "weight_bytes": weight,
            "weight_bytes_by_kind": {k: v for k, v in comm.as_dict().items() if k.endswith("bytes")},
            "total_bytes": s["bytes_sent"] + weight,
            "per_layer": per_layer,
        }
        for k in ("lsh_compression_mean", "lsh_rel_error_mean"):
            if k in s:
                out[k] = s[k]
        return out

    def comm_stats(self) -> dict:
        """Bytes this rank sent since the last optimizer step (``last_step_comm_stats()``: the step before).

        With expert-parallel / model-centric layers, ``token_bytes`` (their token all-to-alls, all-gathers and
        reduce-scatters, forward and backward) is added and counted in ``total``; with LSH on,
        ``lsh_compression`` (rows sent / pairs bound to other ranks, mean over calls) too.
        """
        return self._with_tokens(self.stats.as_dict(), list(self.accounting.calls))

    def last_step_comm_stats(self) -> dict:
        return self._with_tokens(self.last_step_stats.as_dict(), self._last_step_calls)

    @staticmethod
    def _with_tokens(d: dict, calls: list) -> dict:
        if calls:
            tok = sum(c.bytes_sent() for c in calls)
            d["token_bytes"] = tok
            d["total"] += tok
            comp = [c.lsh_compression for c in calls if c.lsh_compression is not None]
            if comp:
                d["lsh_compression"] = sum(comp) / len(comp)
            err = [c.lsh_rel_error for c in calls if c.lsh_rel_error is not None]
            if err:
                d["lsh_rel_error"] = sum(err) / len(err)
        return d

    def _end_step(self) -> None:
        self.last_step_stats, self.stats = self.stats, CommStats()
        self._last_step_calls = list(self.accounting.calls)
        self.accounting.calls.clear()

    def memory_stats(self) -> dict[str, int]:
        """Bytes of expert state this rank holds: shards, fp32 grads/masters/optimizer state, and the cache."""
        params = sum(p.numel() * p.element_size() for p in self.shard_parameters())
        out = {"shard_param_bytes": params, "cache_bytes": self.cache.nbytes()}
        if self.optimizer is not None:
            out.update(self.optimizer.nbytes())
        else:
            out["grad_bytes"] = sum(g.numel() * g.element_size() for g in self.grads.values())
        out["expert_state_bytes"] = sum(v for k, v in out.items() if k != "cache_bytes")
        return out

    def expert_grad_sq_norm(self) -> torch.Tensor:
        """Global squared norm of the expert gradients (disjoint shards: a sum over ranks); a collective."""
        self.synchronize()
        local = torch.zeros((), dtype=torch.float64)
        for g in self.grads.values():
            if g.numel():
                local += g.double().pow(2).sum()
        with blocked(self.stats, "norm"):
            dist.all_reduce(local, group=self.group)
        self.stats.norm_bytes += 8 * (self.world_size - 1)
        return local

    def expert_grads_overflow(self) -> bool:
        self.synchronize()
        bad = torch.tensor([0], dtype=torch.uint8)
        for g in self.grads.values():
            if g.numel() and not torch.isfinite(g).all():
                bad.fill_(1)
        with blocked(self.stats, "norm"):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        self.stats.norm_bytes += self.world_size - 1
        return bool(bad.item())

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.zero_()

    def build_optimizer(self, spec) -> ShardedOptimizer:
        shards = {(layer.index, n): p for layer in self.layers for n, p in layer.shards.items()}
        self.optimizer = ShardedOptimizer.create(shards, self.grads, spec)
        return self.optimizer

    def attach(self, engine, optimizer_config: dict | None = None, lr_scheduler=None) -> None:
        """Drive the shards from ``engine``: step, global clipping, LR schedule, zero_grad, checkpoints."""
        from .engine import attach

        attach(self, engine, optimizer_config=optimizer_config, lr_scheduler=lr_scheduler)

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict with full experts (a collective); ``{}`` on other ranks when ``rank0_only``."""
        from .checkpoint import full_state_dict

        return full_state_dict(self, rank0_only=rank0_only)

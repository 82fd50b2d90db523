"""Step telemetry of FSSDP: weight bytes (:class:`CommStats`) and token accounting, per optimizer step.

Counters reset at each optimizer step (:meth:`StepTelemetry.end_step`); ``last_step_*`` report the step
before (docs/design.md, "FSSDP").
"""
from __future__ import annotations

from ..parallel.accounting import CallStats, CommStats, TokenAccounting, summarize_calls, with_token_bytes


class StepTelemetry:
    """This step's and the last step's CommStats, and the token accounting of the parallel-mode layers."""

    def __init__(self):
        self.stats, self.last_step_stats = CommStats(), CommStats()
        self.accounting = TokenAccounting(history=1 << 16)  # every call of a step, whatever the model size
        self._last_step_calls: list[CallStats] = []

    def end_step(self) -> None:
        """The optimizer stepped: this step's counters become the last step's, fresh ones start."""
        self.last_step_stats, self.stats = self.stats, CommStats()
        self._last_step_calls = list(self.accounting.calls)
        self.accounting.calls.clear()

    def calls(self, last_step: bool = True) -> list[CallStats]:
        """Token-accounting records of the last completed step (``last_step``) or of the current one."""
        return list(self._last_step_calls) if last_step else list(self.accounting.calls)

    def comm_stats(self) -> dict:
        return with_token_bytes(self.stats.as_dict(), self.calls(last_step=False))

    def last_step_comm_stats(self) -> dict:
        return with_token_bytes(self.last_step_stats.as_dict(), self.calls(last_step=True))

    def accounting_summary(self, layer_names: list[str], modes: dict[str, str], replicated: dict[str, int],
                           last_step: bool = True) -> dict:
        """Token accounting and bytes per collective beside the FSSDP weight traffic (see
        :meth:`~.manager.FSSDPManager.accounting_summary`); ``layer_names`` by layer index."""
        calls = self.calls(last_step)
        s = summarize_calls(calls)
        comm = self.last_step_stats if last_step else self.stats
        weight = comm.total_bytes
        per_layer: dict[str, dict] = {}
        for c in calls:
            name = layer_names[c.layer] if c.layer is not None and c.layer < len(layer_names) else str(c.layer)
            d = per_layer.setdefault(name, {"mode": c.mode, "calls": 0, "tokens": 0, "rows_computed": 0, "bytes_sent": 0})
            d["calls"] += 1
            d["tokens"] += c.tokens
            d["rows_computed"] += c.rows_computed
            d["bytes_sent"] += c.bytes_sent()
        out = {
            "modes": modes, "replicated_experts": replicated,
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

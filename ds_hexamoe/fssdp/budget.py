"""Hecate's prediction budget from measurements (``fssdp.budget: "auto"``).

A predicted gather is hidden when it completes within the compute between its issue and its use. Per
layer the budget is how many non-owned expert copies that window can hide at the link's bandwidth,
``floor(window_s * bandwidth / bytes_per_expert)``, bounded by the free room of the cache (a slot holds
one full layer, so every expert the rank does not own fits; the budget never grows memory).

Both numbers are measured online by :class:`LinkMeter`: the window as the seconds between a predicted
gather's issue and its use, the bandwidth from past gathers (bytes / seconds the gather took; a
predicted gather that was complete when used only shows the link is at least that fast). Each rank
measures its own link and budget; the budgets travel with the load exchange, so every rank predicts
every rank's experts alike.
"""
from __future__ import annotations

BLOCKED_S = 1e-4  # a wait shorter than this found the gather complete (its duration is then a bound)


def auto_budget(window_s: float | None, bandwidth: float | None, bytes_per_expert: int, capacity: int) -> int | None:
    """Expert copies a window of ``window_s`` seconds hides at ``bandwidth`` bytes/s, at most ``capacity``;
    None (no limit) until both numbers are measured."""
    if window_s is None or bandwidth is None or bytes_per_expert <= 0:
        return None
    return max(0, min(capacity, int(window_s * bandwidth / bytes_per_expert + 1e-9)))  # whole experts


class LinkMeter:
    """Exponential moving averages (weight ``alpha`` on the newest) of the link bandwidth and, per layer,
    of the window between a predicted gather's issue and its use."""

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha
        self.bandwidth: float | None = None
        self.window: dict[int, float] = {}

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def hidden(self, layer: int, seconds: float) -> None:
        """A predicted gather of ``layer`` was issued ``seconds`` before its use."""
        self.window[layer] = self._ema(self.window.get(layer), max(0.0, seconds))

    def gathered(self, nbytes: int, seconds: float, complete_before: bool = False) -> None:
        """A gather moved ``nbytes`` (the larger of sent and received) in ``seconds``. ``complete_before``:
        it was already done when waited for, so ``seconds`` only bounds its duration from above."""
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        if complete_before:
            self.bandwidth = rate if self.bandwidth is None else max(self.bandwidth, rate)
        else:
            self.bandwidth = self._ema(self.bandwidth, rate)

    def budget(self, layer: int, bytes_per_expert: int, capacity: int) -> int | None:
        return auto_budget(self.window.get(layer), self.bandwidth, bytes_per_expert, capacity)

"""Largest-remainder apportionment: the one rounding rule for every split of an integer by weights.

Batch shares, FSSDP expert ownership and model-centric hidden slices all split an integer total in
proportion to per-rank weights. They share this rule, so a plan's numbers and the runtime's agree:
floor the exact quotas, then hand the leftover units to the largest remainders; equal remainders go to
the lowest index counting from ``start`` (FSSDP passes the layer index, so the extra experts of
successive layers land on different ranks). With ``caps``, no entry exceeds its cap.

:func:`share_bounds` is the one rule for which rows of a global micro-batch a share takes (contiguous, in
share order), used by the heterogeneous batch sampler and the zebra layout alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def largest_remainder(total: int, weights: Sequence[float], *, start: int = 0, caps: Sequence[float] | None = None,
                      what: str = "weights") -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total``; see the module docstring for ties.

    Raises ``ValueError`` naming ``what`` when the weights are not finite numbers >= 0 with a positive
    sum, or when ``caps`` cannot hold ``total``."""
    n = len(weights)
    ok = n > 0 and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                       for w in weights)
    if not ok or sum(weights) <= 0 or total < 0:
        raise ValueError(f"{what}: got {list(weights)!r} for a total of {total}; expected one finite number >= 0 "
                         "per rank with a positive sum")
    cap = [math.inf] * n if caps is None else [float(c) for c in caps]
    if sum(cap) < total:
        raise ValueError(f"{what}: the caps {list(caps)!r} hold less than the total {total}")
    norm = float(sum(weights))
    exact = [total * w / norm for w in weights]
    sizes = [min(math.floor(x + 1e-9), int(c) if math.isfinite(c) else math.floor(x + 1e-9)) for x, c in zip(exact, cap)]
    # remainders compared to 1e-9, so float noise in the quotas never decides a tie
    order = sorted(range(n), key=lambda r: (-round(exact[r] - sizes[r], 9) if weights[r] > 0 else 1.0, (r - start) % n))
    left = total - sum(sizes)
    while left > 0:  # one pass hands out the remainders; later passes only fill ranks that still have room
        for r in order:
            if left > 0 and sizes[r] + 1 <= cap[r]:
                sizes[r] += 1
                left -= 1
    return sizes


def shares_of(shares: Any) -> list[int]:
    """``shares`` (a list, or anything with ``batch_shares``) as a checked list of integers >= 0."""
    s = list(getattr(shares, "batch_shares", shares))
    if not s or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in s) or sum(s) <= 0:
        raise ValueError(f"shares: got {s!r}; expected one integer >= 0 per rank with a positive sum")
    return s


def share_bounds(shares: Any, index: int) -> tuple[int, int]:
    """``[lo, hi)``: the rows of a global micro-batch that share ``index`` takes (contiguous, in share order)."""
    s = shares_of(shares)
    if not 0 <= index < len(s):
        raise ValueError(f"rank: got {index}; expected 0 <= rank < {len(s)} (one share per rank)")
    lo = sum(s[:index])
    return lo, lo + s[index]

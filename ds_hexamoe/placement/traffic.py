"""Exact bytes of one MoE layer call per rank, counted from the concrete routing a step saw.

The planner's cost (:mod:`.problem`) prices expected (token, expert) pairs: an upper bound, because a
token whose k experts share a rank is sent once. This module counts what the runtime's accounting
(``parallel/accounting.CallStats``) records instead, row by row, from the routing itself: per rank the
top-k expert ids ``[T_r, k]`` and, for expert parallel, where each pair goes. Bytes are those sent to
and received from *other* ranks over forward and backward, every collective of the layer included
(the counts/sizes exchange, index metadata, payload). Numpy only: the placement layer never imports
torch.

Per mode (``s``: bytes per element of the activations, ``d``: hidden size, ``w``: world size):

- data_centric: no collective inside the layer (expert weights move in FSSDP, counted there): 0.
- expert_parallel: a token goes once to every other rank that computes one of its pairs. With ``out``
  such rows sent and ``in`` received: counts ``32 (w-1)`` each way; index rows ``4k`` bytes; dispatch
  rows ``(d + k) s`` (hidden and routing weights) forward and back as gradients; combine rows ``d s``.
  sent = ``32 (w-1) + 4k out + (2d + k) s (out + in)``; received = ``32 (w-1) + 4k in + (2d + k) s (in + out)``.
- model_centric: all-gathers move chunks padded to the largest rank's ``T_max`` (gloo needs equal
  sizes); reduce-scatters move exact rows. With ``N = sum T``: sent = ``24 (w-1) + (w-1) T_max (4k +
  (2d + k) s) + (2d + k) s (N - T_r)``; received the same with ``(w-1) T_r`` in place of ``N - T_r``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..config import MODES

_COUNTS_ROW = 8 * 4  # int64 [rows, digest, k, d] per destination in the counts exchange
_SIZES_ROW = 8 * 3  # int64 [T, k, d] in model-centric's sizes all-gather


def owner_destinations(routing: Sequence[np.ndarray], owner: Sequence[int] | Mapping[int, Sequence[int]]) -> list[np.ndarray]:
    """Destination rank of every pair when each expert lives on exactly one rank (``owner[e]``, or a
    placement ``{e: [rank]}``). Replicated experts split pairs by the runtime's rule: pass its
    destinations to :func:`layer_bytes` instead."""
    if isinstance(owner, Mapping):
        many = [e for e, rs in owner.items() if len(list(rs)) != 1]
        if many:
            raise ValueError(f"owner_destinations: experts {many[:5]} have several replicas; pass the runtime's "
                             "per-pair destinations (dest=) for replicated placements")
        owner = [int(list(owner[e])[0]) for e in range(len(owner))]
    table = np.asarray(owner, dtype=np.int64)
    return [table[np.asarray(r, dtype=np.int64)] for r in routing]


def _2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    return a if a.ndim == 2 else a.reshape(len(a), 1)


def _check(routing: Sequence[np.ndarray], world: int) -> tuple[list[np.ndarray], int]:
    if len(routing) != world:
        raise ValueError(f"layer_bytes: routing has {len(routing)} ranks; expected one [T, k] array per rank ({world})")
    arrs = [_2d(r) for r in routing]
    ks = {a.shape[1] for a in arrs if a.shape[0]}
    if len(ks) > 1:
        raise ValueError(f"layer_bytes: top-k differs across ranks ({sorted(ks)}); every rank routes to the same k")
    return arrs, (ks.pop() if ks else 1)


def _ep_rows(dest: Sequence[np.ndarray], world: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows each rank sends to other ranks, and receives from them."""
    rows = np.zeros((world, world), dtype=np.int64)  # rows[src, dst]: tokens of src with a pair on dst
    for src, dt in enumerate(dest):
        dt = _2d(dt)
        goes = np.zeros((dt.shape[0], world), dtype=bool)
        if dt.size:
            goes[np.repeat(np.arange(dt.shape[0]), dt.shape[1]), dt.reshape(-1)] = True
        rows[src] = goes.sum(axis=0)
    np.fill_diagonal(rows, 0)  # the self-chunk is a local copy
    return rows.sum(axis=1), rows.sum(axis=0)


def layer_bytes(mode: str, routing: Sequence[np.ndarray], hidden: int, elem_bytes: int = 4,
                dest: Sequence[np.ndarray] | None = None) -> dict[str, list[int]]:
    """``{"sent": [R], "received": [R]}``: bytes of one MoE layer call (forward and backward) per rank.

    ``routing[r]``: rank ``r``'s top-k expert ids ``[T_r, k]``; ``dest[r]`` (expert parallel): each
    pair's destination rank, same shape (:func:`owner_destinations` for unreplicated placements).
    LSH-compressed dispatch is not covered (its rows depend on the hidden states)."""
    world = len(routing)
    arrs, k = _check(routing, world)
    if mode == "data_centric":
        zero = [0] * world
        return {"sent": zero, "received": list(zero)}
    s, d = int(elem_bytes), int(hidden)
    if mode == "expert_parallel":
        if dest is None:
            raise ValueError("layer_bytes: expert_parallel needs dest= (each pair's destination rank)")
        out, inn = _ep_rows(dest, world)
        fixed = _COUNTS_ROW * (world - 1)
        row = (2 * d + k) * s
        sent = fixed + 4 * k * out + row * (out + inn)
        recv = fixed + 4 * k * inn + row * (inn + out)
        return {"sent": [int(v) for v in sent], "received": [int(v) for v in recv]}
    if mode == "model_centric":
        T = np.array([a.shape[0] for a in arrs], dtype=np.int64)
        gathered = _SIZES_ROW * (world - 1) + (world - 1) * int(T.max()) * (4 * k + (2 * d + k) * s)
        sent = gathered + (2 * d + k) * s * (T.sum() - T)
        recv = gathered + (2 * d + k) * s * (world - 1) * T
        return {"sent": [int(v) for v in sent], "received": [int(v) for v in recv]}
    raise ValueError(f"layer_bytes: mode {mode!r}; expected one of {MODES}")

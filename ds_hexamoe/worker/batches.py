"""The worker's one data order: micro-batch ``i`` of a rank is addressed by the number of micro-batches
consumed, so a resumed run reads exactly the batches the uninterrupted run would have (docs/design.md,
"Recipes, tasks, worker and CLI").

Every rank reads the same global micro-batch ``i`` (``micro_batch_size x world`` samples of a seeded
permutation per epoch, an incomplete last batch dropped) and keeps its share, cut by
:class:`~ds_hexamoe.hetero.ShareSampler`: even shares, the heterogeneous plan's (read at every batch, so
a re-plan applies from the next one) or the zebra layout's attention shares."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..config import ConfigError
from ..hetero.batching import ShareSampler


class BatchPlan:
    """Micro-batch ``i`` of share ``index`` (default: ``rank``) of ``shares`` (default: ``micro_batch_size``
    for every rank; a list or an object with ``batch_shares``), for any ``i``."""

    def __init__(self, dataset, micro_batch_size: int, rank: int, world_size: int, seed: int, shares: Any = None,
                 index: int | None = None):
        n = len(dataset)
        self.global_size = micro_batch_size * world_size
        if n // self.global_size == 0:
            raise ConfigError(f"training.micro_batch_size: {micro_batch_size} x {world_size} ranks needs at least "
                              f"{self.global_size} training blocks but the data has {n}; lower micro_batch_size or "
                              "data.seq_len, or add data")
        self.shares = [micro_batch_size] * world_size if shares is None else shares
        self.sampler = ShareSampler(n, self.shares, rank if index is None else index, seed=seed)
        self.per_epoch = n // self.global_size

    def indices(self, i: int) -> list[int]:
        shares = list(getattr(self.shares, "batch_shares", self.shares))
        if sum(shares) != self.global_size:  # a plan's global batch is micro_batch_size x world
            raise RuntimeError(f"batch shares {shares} do not sum to the global micro-batch {self.global_size}")
        return self.sampler.rows_at(i)

    def batches(self, dataset, collate, start: int) -> Iterator[dict]:
        i = start
        while True:
            yield collate([dataset[k] for k in self.indices(i)])
            i += 1

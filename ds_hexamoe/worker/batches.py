"""The worker's data order: micro-batch ``i`` of a rank is addressed by the number of micro-batches
consumed, so a resumed run reads exactly the batches the uninterrupted run would have (docs/design.md,
"Recipes, tasks, worker and CLI")."""
from __future__ import annotations

from collections.abc import Iterator

from ..config import ConfigError
from ..hetero.batching import ShareSampler


def _micro_batches_per_epoch(samples: int, per_batch: int, micro_batch_size: int, world_size: int,
                             dataset_len: int) -> int:
    n = samples // per_batch
    if n == 0:
        raise ConfigError(f"training.micro_batch_size: {micro_batch_size} x {world_size} ranks needs at least "
                          f"{micro_batch_size * world_size} training blocks but the data has {dataset_len}; "
                          "lower micro_batch_size or data.seq_len, or add data")
    return n


class BatchPlan:
    """Micro-batch ``i`` of this rank, for any ``i``: epoch ``i // per_epoch`` of a ``DistributedSampler``
    with a fixed seed."""

    def __init__(self, dataset, micro_batch_size: int, rank: int, world_size: int, seed: int):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.mbs = micro_batch_size
        self.per_epoch = _micro_batches_per_epoch(len(self.sampler), micro_batch_size, micro_batch_size, world_size,
                                                  len(dataset))
        self._epoch, self._order = None, None

    def indices(self, i: int) -> list[int]:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(iter(self.sampler))
        return self._order[j * self.mbs : (j + 1) * self.mbs]

    def batches(self, dataset, collate, start: int) -> Iterator[dict]:
        i = start
        while True:
            idx = self.indices(i)
            yield collate([dataset[k] for k in idx])
            i += 1


class SharedBatchPlan(BatchPlan):
    """Heterogeneous placement: every rank reads the same global micro-batch ``i`` (``micro_batch_size x
    world`` samples of a seeded permutation, cut by :class:`~ds_hexamoe.hetero.ShareSampler`) and keeps
    its plan share, read at every batch so a re-plan applies from the next one. Loss scaling in the loop
    keeps the result equal to one process."""

    def __init__(self, dataset, micro_batch_size: int, rank: int, world_size: int, seed: int, hetero):
        n = len(dataset)
        self.hetero, self.mbs = hetero, micro_batch_size
        self.global_size = micro_batch_size * world_size
        self.per_epoch = _micro_batches_per_epoch(n, self.global_size, micro_batch_size, world_size, n)
        self.sampler = ShareSampler(n, hetero, rank, seed=seed)

    def indices(self, i: int) -> list[int]:
        epoch, j = divmod(i, self.per_epoch)
        shares = list(self.hetero.batch_shares)
        if sum(shares) != self.global_size:  # the plan's global batch is micro_batch_size x world
            raise RuntimeError(f"plan batch shares {shares} do not sum to the global micro-batch {self.global_size}")
        return self.sampler.rows(j, epoch)


def make_batch_plan(dataset, micro_batch_size: int, rank: int, world_size: int, seed: int, hetero=None) -> BatchPlan:
    """:class:`SharedBatchPlan` under a heterogeneous plan (``hetero``), else :class:`BatchPlan`."""
    if hetero is not None:
        return SharedBatchPlan(dataset, micro_batch_size, rank, world_size, seed, hetero)
    return BatchPlan(dataset, micro_batch_size, rank, world_size, seed)

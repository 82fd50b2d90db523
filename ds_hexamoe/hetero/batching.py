"""Uneven micro-batches per rank with exact results.

The plan gives rank ``r`` ``shares[r]`` samples of every global micro-batch (``sum(shares)`` samples).
Each rank's loss is a mean over its own tokens; DeepSpeed then averages gradients over ranks with equal
weights. Scaling rank ``r``'s loss by ``world * gas * n_r / N`` (``n_r`` its tokens, ``N`` the tokens of
the whole optimizer step over all ranks and micro-steps, tokens counted where ``labels != -100``) makes
that equal average the gradient of the mean loss over the union::

    mean_r (world * gas * n_r / N) * grad L_r  (DeepSpeed also divides by gas)  =  sum_r n_r / N * grad L_r

which is what one process training on the union computes. FSSDP's expert gradients are averaged the
same way, so the scale covers them too.

Training loop::

    hetero = engine.hexamoe.hetero
    for ids, labels in global_batches:            # every rank reads the same global micro-batch ...
        x, y = split_batch(ids, hetero.batch_shares, rank), split_batch(labels, hetero.batch_shares, rank)
        n, N = count_tokens(y), count_tokens(labels)  # ... so N needs no communication
        loss = engine(input_ids=x, labels=y).loss
        engine.backward(loss * loss_scale(n, N, world))
        engine.step(); engine.hexamoe.after_step(engine.global_steps)

or, with a dataset, ``DataLoader(ds, batch_sampler=ShareSampler(len(ds), hetero, rank))`` and
``global_token_count(n)`` (one all-reduce) for ``N``.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..apportion import share_bounds, shares_of as _shares_of
from ..distributed import host_all_reduce


def split_batch(global_batch: Any, shares: Any, rank: int) -> Any:
    """This rank's rows of ``global_batch`` (a tensor, list, or dict of them; rows = dim 0).

    ``shares`` is a list of per-rank sample counts or anything with ``batch_shares`` (the runtime's
    :class:`~ds_hexamoe.hetero.HeteroController`); its sum must equal the number of rows."""
    s = _shares_of(shares)
    lo, hi = share_bounds(s, rank)
    if isinstance(global_batch, dict):
        return {k: split_batch(v, s, rank) if _rows(v) is not None else v for k, v in global_batch.items()}
    n = _rows(global_batch)
    if n is None:
        raise TypeError(f"split_batch: got {type(global_batch).__name__}; expected a tensor, a list or a dict of them")
    if n != sum(s):
        raise ValueError(f"split_batch: the global batch has {n} rows but the shares {s} sum to {sum(s)}; read "
                         "global micro-batches of sum(shares) samples")
    return global_batch[lo:hi]


def _rows(x: Any) -> int | None:
    if torch.is_tensor(x):
        return x.size(0) if x.dim() > 0 else None
    if isinstance(x, (list, tuple)):
        return len(x)
    return None


def count_tokens(labels: torch.Tensor, ignore_index: int = -100, shift: bool = True) -> int:
    """Tokens that contribute to a causal LM loss: ``labels[..., 1:] != ignore_index`` (``shift``, as
    transformers' ``ForCausalLMLoss`` shifts labels by one), or ``labels != ignore_index``."""
    y = labels[..., 1:] if shift else labels
    return int((y != ignore_index).sum())


def loss_scale(local_tokens: int | float, global_tokens: int | float, world: int, gradient_accumulation_steps: int = 1) -> float:
    """Factor for this rank's mean loss so DeepSpeed's equal averaging gives the mean over the union.

    ``global_tokens``: tokens of the whole optimizer step (all ranks, all ``gradient_accumulation_steps``
    micro-steps). Returns ``world * gas * local / global``."""
    if world < 1 or gradient_accumulation_steps < 1:
        raise ValueError(f"loss_scale: world={world}, gradient_accumulation_steps={gradient_accumulation_steps}; "
                         "expected integers >= 1")
    if global_tokens <= 0:
        raise ValueError(f"loss_scale: global_tokens={global_tokens}; the step has no token with a label "
                         "(labels != -100): nothing to average")
    if local_tokens < 0 or local_tokens > global_tokens:
        raise ValueError(f"loss_scale: local_tokens={local_tokens} outside [0, global_tokens={global_tokens}]")
    return world * gradient_accumulation_steps * float(local_tokens) / float(global_tokens)


def global_token_count(local_tokens: int, group=None) -> int:
    """Sum of ``local_tokens`` over the ranks (one all-reduce; the local value without torch.distributed)."""
    t = host_all_reduce(torch.tensor([float(local_tokens)], dtype=torch.float64), group=group)
    return int(round(float(t.item())))


class ShareSampler(torch.utils.data.Sampler):
    """A batch sampler giving ``rank`` its share of each global micro-batch.

    Every rank draws the same permutation (``seed`` + epoch), cuts it into global micro-batches of
    ``sum(shares)`` samples and yields its own rows. ``shares`` is a list or an object with
    ``batch_shares`` read at every batch, so a re-plan takes effect at the next batch on all ranks
    alike. Use as ``DataLoader(ds, batch_sampler=ShareSampler(len(ds), engine.hexamoe.hetero, rank))``.
    An incomplete last global batch is dropped (every rank must run every step). :meth:`rows` and
    :meth:`rows_at` address one global micro-batch directly (the recipe worker's resumable data order,
    for the colocated and the zebra step alike).
    """

    def __init__(self, num_samples: int, shares: Any, rank: int, *, shuffle: bool = True, seed: int = 0):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: got {num_samples!r}; expected an integer >= 1 (len(dataset))")
        self.num_samples, self.shares, self.rank = num_samples, shares, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self._order_epoch, self._order = None, None
        share_bounds(shares, rank)  # validates now

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int | None = None) -> list[int]:
        """The sample order of ``epoch`` (default: the current one), the same on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self._order_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                order = list(range(self.num_samples))
            self._order_epoch, self._order = epoch, order
        return self._order

    def _cut(self, order: list[int], pos: int, shares: list[int]) -> list[int]:
        lo, hi = share_bounds(shares, self.rank)
        return order[pos + lo:pos + hi]

    def rows(self, j: int, epoch: int | None = None) -> list[int]:
        """This rank's rows of global micro-batch ``j`` of ``epoch`` (the current shares' sum per batch)."""
        s = _shares_of(self.shares)
        return self._cut(self.order(epoch), j * sum(s), s)

    def rows_at(self, i: int) -> list[int]:
        """This rank's rows of global micro-batch ``i`` counted from the start of training: batch
        ``i % len(self)`` of epoch ``i // len(self)``, the epoch rule of iteration (an incomplete last
        global batch is dropped)."""
        epoch, j = divmod(i, len(self))
        return self.rows(j, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        pos = 0
        while True:
            s = _shares_of(self.shares)
            total = sum(s)
            if pos + total > self.num_samples:
                return
            yield self._cut(order, pos, s)
            pos += total

    def __len__(self) -> int:
        return self.num_samples // sum(_shares_of(self.shares))

"""Deterministic, resumable, shardable batch loading.

The order of an epoch is a pure function of ``(seed, epoch)`` (``split.permutation``), so a run can
resume at ``(epoch, batch k)`` by computing indices, without reading any data. With data parallel
training each *global* batch holds ``world_size × batch_size`` blocks and rank ``r`` takes the
``r``-th slice of it::

    global batch k = order[k*G : (k+1)*G]          G = world_size * batch_size
    rank r's part  = global batch k [r*B : (r+1)*B]

so a 2-process run sees exactly the global batches of a 1-process run with ``batch_size`` doubled.
Gradient accumulation over ``A`` micro-batches is ``A`` consecutive global batches.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .pack import collate
from .split import permutation


class BlockSampler:
    """Which blocks rank ``rank`` reads in batch ``k`` of epoch ``e``.

    ``drop_last=True`` drops the final partial global batch (every rank then gets the same number
    of full batches, as DDP needs); with ``False`` the partial batch is shared out in slices of
    ``batch_size`` and ranks past its end get nothing for it.
    """

    def __init__(self, n_items: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n_items, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size

    def order(self, epoch: int) -> torch.Tensor:
        """``(n,)`` int64: the epoch's order of all items (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.n, dtype=torch.int64)
        return permutation(self.n, self.seed, stream=epoch + 1)

    def __len__(self) -> int:
        """Global batches per epoch (the same count on every rank)."""
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def indices(self, epoch: int, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """``(≤B,)`` this rank's item indices of global batch ``k`` of ``epoch``."""
        order = self.order(epoch) if order is None else order
        lo = k * self.global_batch + self.rank * self.batch_size
        hi = min(lo + self.batch_size, (k + 1) * self.global_batch)
        return order[lo:hi]

    def iter(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """This rank's index batches of ``epoch`` from global batch ``start`` on (empty ones skipped)."""
        order = self.order(epoch)
        for k in range(start, len(self)):
            idx = self.indices(epoch, k, order)
            if idx.numel():
                yield idx


class BlockLoader:
    """Iterates batches (dicts of ``(B, T)`` tensors, see ``BlockDataset``) of one epoch for one rank."""

    def __init__(self, dataset, sampler: BlockSampler, epoch: int = 0):
        self.dataset, self.sampler, self.epoch = dataset, sampler, epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches(0)

    def batches(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from global batch ``start`` on: resuming skips ahead without reading data."""
        for idx in self.sampler.iter(self.epoch, start):
            yield self.fetch(idx)

    def fetch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if hasattr(self.dataset, "batch"):
            return self.dataset.batch(idx)  # vectorised gather
        return collate([self.dataset[int(i)] for i in idx])


def make_loader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0, *,
                rank: int = 0, world_size: int = 1, drop_last: bool = True) -> BlockLoader:
    """A deterministic loader of ``dataset`` for ``epoch``; ``batch_size`` is per rank (micro-batch).

    ``loader.batches(start=k)`` resumes at global batch ``k`` of the epoch.
    """
    sampler = BlockSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank,
                           world_size=world_size, drop_last=drop_last)
    return BlockLoader(dataset, sampler, epoch)

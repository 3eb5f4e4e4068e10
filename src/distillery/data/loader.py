"""Deterministic, resumable, shardable batch loading.

The order of an epoch is a pure function of ``(seed, epoch)`` (``split.permutation``), so a run can
resume at ``(epoch, batch k)`` by computing indices, without reading any data. With data parallel
training each *global* batch holds ``world_size × batch_size`` blocks and rank ``r`` takes the
``r``-th slice of it::

    global batch k = order[k*G : (k+1)*G]          G = world_size * batch_size
    rank r's part  = global batch k [r*B : (r+1)*B]

so a 2-process run sees exactly the global batches of a 1-process run with ``batch_size`` doubled.
Gradient accumulation over ``A`` micro-batches is ``A`` consecutive global batches.

**Weighted passes** (``data.weights``, :func:`block_weights`): with per-block weights ``w`` an epoch is one pass
over a multiset of blocks, then shuffled as above: every block ``floor(w)`` times, plus, within each group of blocks
of equal weight, a seeded share ``w - floor(w)`` of them once more (another share each epoch). The pass has the
same length every epoch (the resume arithmetic above needs it) and the cached teacher targets still serve it:
they are keyed by the block, not by its place in the pass. Without weights the order is exactly the unweighted one.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DistilleryError
from .pack import collate
from .split import permutation

# the permutation streams of the fractional shares (:func:`pass_items`), far from the epochs' own (epoch + 1)
SHARE_STREAM = 1 << 40


def pass_items(weights: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The blocks of one weighted pass, unshuffled (module docstring): each block ``i`` ``floor(w_i)`` times, and
    of each group of equal weight a seeded ``round(share * size)`` of its blocks once more."""
    parts = []
    for w in torch.unique(weights).tolist():
        members = torch.nonzero(weights == w).flatten()
        whole, share = int(w), w - int(w)
        parts += [members] * whole
        take = round(share * len(members))
        if take:
            parts.append(members[permutation(len(members), seed, stream=SHARE_STREAM + epoch)[:take]])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def block_weights(dataset, weights: dict[str, float] | None) -> torch.Tensor | None:
    """``data.weights`` (``{'chat': w, 'text': w}``, 1 where absent) as one weight per block of ``dataset`` (a
    :class:`~.pack.BlockDataset` or a wrapper holding one as ``.blocks``); None when every weight is 1."""
    weights = weights or {}
    if all(float(weights.get(k, 1.0)) == 1.0 for k in ("chat", "text")):
        return None
    blocks = getattr(dataset, "blocks", dataset)
    chat = blocks.chat_blocks()
    out = torch.where(chat, float(weights.get("chat", 1.0)), float(weights.get("text", 1.0))).to(torch.float64)
    if not out.any():
        kinds = "conversation" if bool(chat.all()) else "plain-text" if not bool(chat.any()) else "training"
        raise DistilleryError(f"data.weights {dict(weights)} leave none of the {len(out)} {kinds} blocks to train on")
    return out


class BlockSampler:
    """Which blocks rank ``rank`` reads in batch ``k`` of epoch ``e``.

    ``drop_last=True`` drops the final partial global batch (every rank then gets the same number
    of full batches, as DDP needs); with ``False`` the partial batch is shared out in slices of
    ``batch_size`` and ranks past its end get nothing for it.
    """

    def __init__(self, n_items: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, weights: torch.Tensor | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if weights is not None and len(weights) != n_items:
            raise ValueError(f"{len(weights)} block weights for {n_items} blocks")
        self.weights = weights  # None: every block once a pass
        # the items of a pass: the blocks, or the weighted pass's multiset (same length every epoch)
        self.n = n_items if weights is None else len(pass_items(weights, seed, 0))
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self._memo: tuple[int, torch.Tensor] | None = None
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size

    def order(self, epoch: int) -> torch.Tensor:
        """``(n,)`` int64: the epoch's order of all items (identical on every rank); with weights, of the pass.
        The last epoch's order is kept: the loop asks for it once per micro-batch (a pure function, so a memo)."""
        if self._memo is not None and self._memo[0] == epoch:
            return self._memo[1]
        self._memo = (epoch, self._order(epoch))
        return self._memo[1]

    def _order(self, epoch: int) -> torch.Tensor:
        if self.weights is None:
            if not self.shuffle:
                return torch.arange(self.n, dtype=torch.int64)
            return permutation(self.n, self.seed, stream=epoch + 1)
        items = pass_items(self.weights, self.seed, epoch)
        return items[permutation(self.n, self.seed, stream=epoch + 1)] if self.shuffle else items

    def __len__(self) -> int:
        """Global batches per epoch (the same count on every rank)."""
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def indices(self, epoch: int, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """``(≤B,)`` this rank's item indices of global batch ``k`` of ``epoch``."""
        order = self.order(epoch) if order is None else order
        lo = k * self.global_batch + self.rank * self.batch_size
        hi = min(lo + self.batch_size, (k + 1) * self.global_batch)
        return order[lo:hi].clone()  # not a view of the memo: a caller may write into its batch

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
                rank: int = 0, world_size: int = 1, drop_last: bool = True,
                weights: torch.Tensor | None = None) -> BlockLoader:
    """A deterministic loader of ``dataset`` for ``epoch``; ``batch_size`` is per rank (micro-batch).

    ``loader.batches(start=k)`` resumes at global batch ``k`` of the epoch.
    """
    sampler = BlockSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank,
                           world_size=world_size, drop_last=drop_last, weights=weights)
    return BlockLoader(dataset, sampler, epoch)

"""Seeded permutations that are the same on every machine, and the train/validation split.

``permutation(n, seed, stream)`` sorts ``0..n-1`` by a SplitMix64 hash of each id: plain 64-bit
integer arithmetic in NumPy, so the order depends on nothing but ``(n, seed, stream)`` (not on the
torch or NumPy RNG implementations, the platform, or the thread count). A test pins its output.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DistilleryError

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
SPLIT_STREAM = 0  # the train/validation split; loaders use stream epoch + 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``x + golden`` on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permutation(n: int, seed: int, stream: int = SPLIT_STREAM) -> torch.Tensor:
    """``(n,)`` int64: a permutation of ``0..n-1`` that is a pure function of ``(n, seed, stream)``."""
    key = np.array([((seed & _MASK) * _GOLDEN + (stream & _MASK)) & _MASK], dtype=np.uint64)
    base = _splitmix64(_splitmix64(key))[0]
    ranks = _splitmix64(np.arange(n, dtype=np.uint64) ^ base)
    return torch.from_numpy(np.argsort(ranks, kind="stable").astype(np.int64))


def split_blocks(n: int, val_fraction: float, seed: int, max_train: int | None = None,
                 max_val: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ids of (train, validation), each in shuffled order and capped to its first N.

    The seeded permutation of all ``n`` blocks is cut once: its first ``round(val_fraction * n)``
    (at least 1 when ``val_fraction > 0``) go to validation, the rest to training. Both keep the
    permutation's order, so raising a cap only appends blocks.
    """
    order = permutation(n, seed)
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise DistilleryError(f"the data make only {n} block(s): too few to hold out data.val_fraction="
                              f"{val_fraction} for validation (lower data.seq_len or add data)")
    val, train = order[:n_val], order[n_val:]
    return train[:max_train], val[:max_val]

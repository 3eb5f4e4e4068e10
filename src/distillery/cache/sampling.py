"""The cache's sampled tail: which draws a position gets, reproducibly, from a recorded seed.

A cache with a sampled tail stores, per position, the top-``k`` entries plus ``m`` ids drawn from the
teacher's tail distribution (:func:`distillery.targets.sample_tail`: stratified, one draw per
equal-mass stratum of the tail's cdf in vocabulary-id order). The draw's uniform numbers must not
depend on batch size, rank, resume point or the order shards are written in, so they are a pure
function of ``(seed, block index, position t, draw j)``: a counter-based SplitMix64 hash,

    key  = mix(mix(seed) XOR index)
    h    = mix(key XOR (t << 32 | j))
    U    = (h >> 11) · 2^-53                                   (float64 in [0, 1))
    mix(x): x += 0x9E3779B97F4A7C15;
            x = (x XOR x >> 30) · 0xBF58476D1CE4E5B9;
            x = (x XOR x >> 27) · 0x94D049BB133111EB;  x XOR x >> 31        (all mod 2^64)

so a resumed, multi-process or one-process run draws the same ids (given the same teacher log-probs),
and another tool can recompute them. The manifest records the scheme under ``"tail"``:
``{"scheme": "sampled", "m": M, "seed": S, "sampler": SAMPLER}`` (or ``{"scheme": "bucket", "m": 0}``).
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLER = "stratified-vocab-order/splitmix64-v1"  # names this module's exact draw rule
TAIL_SCHEMES = ("bucket", "sampled")

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def tail_uniforms(seed: int, indices, seq_len: int, m: int) -> torch.Tensor:
    """``(B,)`` block indices -> ``(B, seq_len, m)`` float64 uniforms in ``[0, 1)`` (module docstring)."""
    idx = np.asarray(torch.as_tensor(indices).reshape(-1).cpu().numpy(), dtype=np.int64).astype(np.uint64)
    key = _mix(_mix(np.full(idx.shape, seed, dtype=np.uint64)) ^ idx)  # (B,)
    counter = (np.arange(seq_len, dtype=np.uint64)[:, None] << np.uint64(32)) | np.arange(m, dtype=np.uint64)
    h = _mix(key[:, None, None] ^ counter[None])  # (B, T, m)
    return torch.from_numpy((h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def tail_record(m: int, seed: int) -> dict:
    """The manifest's ``"tail"`` entry for ``m`` draws per position (``m = 0``: one tail bucket only)."""
    if m < 0:
        raise ValueError(f"tail samples must be >= 0, got {m}")
    if m == 0:
        return {"scheme": "bucket", "m": 0}
    return {"scheme": "sampled", "m": int(m), "seed": int(seed), "sampler": SAMPLER}


def read_tail_record(manifest: dict) -> dict:
    """The ``"tail"`` entry of a manifest; caches written before sampled tails have none: bucket, m = 0."""
    return manifest.get("tail", {"scheme": "bucket", "m": 0})

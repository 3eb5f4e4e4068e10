"""One next token per row from ``(B, V)`` logits: greedy, or a draw from the tempered, nucleus-cut softmax.

Its own module because both samplers use it (:mod:`distillery.generate`'s loop and
:class:`distillery.static_decode.StaticDecoder`), and the decoder sits below ``generate`` in the imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw


def next_tokens(logits: torch.Tensor, sample_temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from ``logits (B, V)``; returns ``(B,)`` int64.

    Greedy when ``sample_temperature == 0``; otherwise draws from softmax(logits / sample_temperature)
    restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling;
    the most likely token is always kept).

    The draw inverts the CDF in two levels: ``u ~ U(0, 1)`` per row; the block of ``CDF_BLOCK`` tokens is the
    first ``j`` with ``C[j] > u · C[-1]`` (``C`` the cumulative block masses, float64), then the token inside
    it the same way on that block's own cumulative sum (float64). ``torch.multinomial`` draws V exponentials
    per row instead (12.6 ms of a 35 ms decode step at V = 49,152, B = 8); one float64 cumulative sum over
    all of V took 2.8 ms, this 0.6 ms.
    """
    if sample_temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.float()
    probs = torch.softmax(x if sample_temperature == 1 else x / sample_temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    B, V = probs.shape
    nb = -(-V // CDF_BLOCK)
    blocks = (F.pad(probs, (0, nb * CDF_BLOCK - V)) if V % CDF_BLOCK else probs).view(B, nb, CDF_BLOCK)  # zero padded
    mass = blocks.sum(dim=-1, dtype=torch.float64)                            # (B, nb)
    cdf = mass.cumsum(dim=-1)                                                 # (B, nb)
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    j = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)            # (B, 1): first C[j] > u
    inner = blocks.gather(1, j[:, :, None].expand(B, 1, CDF_BLOCK))[:, 0].double().cumsum(dim=-1)  # (B, blk)
    rest = u - (cdf.gather(1, j) - mass.gather(1, j))                         # (B, 1) mass into block j
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 1e-12))                   # rounding: stay inside the block's mass
    k = torch.searchsorted(inner, rest, right=True).clamp_(max=CDF_BLOCK - 1)
    return (j * CDF_BLOCK + k).squeeze(1).clamp_(max=V - 1)

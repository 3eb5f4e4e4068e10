"""Sequence-level unlikelihood on the student's own continuations: a training-time cure for greedy loops.

Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training" (ICLR; arXiv:1908.04319), §5.2: the model
continues a prompt greedily; every token ``y_t`` of that continuation that belongs to a repeated n-gram becomes a
*negative* candidate, and the loss lowers its probability:

    UL = Σ_{t marked} −log(1 − q(y_t | y_<t)),     q = softmax(z) at temperature 1,

computed exactly as ``logsumexp(z) − logsumexp(z without y_t)``, so a repeat the student is certain of (q = 1 in
fp32) still has a finite value and a gradient, ``q − q'`` with ``q'`` the softmax without ``y_t`` (every entry in
[−1, 1]).

Marking (:func:`repeat_mask`): label position ``t`` of a row is marked when the n-gram of generated tokens ending
at its label, ``(y_{t−n+1}, …, y_t)``, already occurred earlier in the same row's continuation (n = 4 in the paper;
``loss.unlikelihood_ngram``). So a loop's first occurrence is left alone and every token that repeats it is
penalised. Per marked row the gradient ``q − q'`` equals ``q_y / (1 − q_y) · (e_y − q)``: the CE gradient reversed
and weighted by how sure the student is of the repeat, so a near-certain loop is pushed hardest.

Why by hand: no library we build on (transformers, TRL, torchtune) ships unlikelihood training. Where it runs:
``distillery.train`` on on-policy steps when ``loss.unlikelihood_weight > 0`` (the samples are the student's own; with
``generation.sample_temperature = 0`` they are exactly the greedy continuations that loop). Marked positions get this
term instead of KD and CE: the teacher, reading a loop in its context, predicts the loop too, and KD there would
pull the other way (``docs/prune.md``, on-policy distillation).

:func:`unlikelihood_loss` applies the LM head to the marked rows only, ``chunk_rows`` at a time, each chunk under
activation checkpointing, so one ``(chunk_rows, V)`` block of logits is alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def repeat_mask(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, T)`` labels (−100 = no target) -> ``(B, T)`` bool: the positions whose label ends an n-gram of the row's
    target tokens (taken in order, skipping −100) that already occurred earlier in that row (module docstring)."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    out = torch.zeros(labels.shape, dtype=torch.bool)
    for b, row in enumerate(labels.tolist()):
        pos = [t for t, y in enumerate(row) if y != -100]
        toks = [row[t] for t in pos]
        seen: set[tuple[int, ...]] = set()
        for k in range(n - 1, len(toks)):
            gram = tuple(toks[k - n + 1:k + 1])
            if gram in seen:
                out[b, pos[k]] = True
            seen.add(gram)
    return out.to(labels.device)


def split_repeats(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels (B, T)`` -> ``(kd_labels, ul_labels)``: the marked positions (:func:`repeat_mask`) move from the first
    to the second (−100 elsewhere), so KD and CE skip them and the unlikelihood term reads them."""
    marked = repeat_mask(labels, n)
    return labels.masked_fill(marked, -100), labels.masked_fill(~marked, -100)


def _chunk_ul(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    rest = z.scatter(-1, y[:, None], float("-inf")).logsumexp(-1)  # log Σ_{v ≠ y} e^{z_v}
    return (z.logsumexp(-1) - rest).sum()  # −log(1 − q(y)), exact where q(y) rounds to 1


def unlikelihood_loss(hidden: torch.Tensor, weight: torch.Tensor, ul_labels: torch.Tensor, *,
                      bias: torch.Tensor | None = None, chunk_rows: int = 64,
                      vocab_size: int | None = None) -> tuple[torch.Tensor, int]:
    """``Σ_marked −log(1 − q(label))`` and the number of marked rows.

    Args:
        hidden: ``(B, T, H)`` the student's final hidden states (differentiable).
        weight / bias: the LM head ``(V, H)`` / ``(V,)``. The matmul runs in the weight's dtype, or in the autocast
            dtype under autocast (as the student's own head would); the log-sum-exps in fp32 (fp64 with fp64 weights).
        ul_labels: ``(B, T)``, the label at marked positions, −100 elsewhere (:func:`split_repeats`).
        vocab_size: only the first ``vocab_size`` logits form the distribution (padded embeddings).
    """
    rows = (ul_labels.reshape(-1) != -100).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return hidden.sum() * 0.0, 0
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    y = ul_labels.reshape(-1).index_select(0, rows)
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    total = h.new_zeros((), dtype=torch.promote_types(weight.dtype, torch.float32))
    for lo in range(0, h.shape[0], max(1, chunk_rows)):
        sl = slice(lo, lo + max(1, chunk_rows))
        total = total + checkpoint(_chunk_ul, h[sl], weight, bias, y[sl], use_reentrant=False)
    return total, int(rows.numel())

"""Logit comparisons used by export verification, quantization reports and the device benchmark.

Every function takes logits of shape ``(N, V)`` (one row per position) as numpy arrays or tensors
and returns plain floats, so the results go straight into JSON.
"""

from __future__ import annotations

import numpy as np
import torch


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()


def compare_logits(ref, test) -> dict[str, float]:
    """Compare ``test`` logits with reference logits ``ref``, both ``(N, V)``.

    Returns ``max_abs_diff`` (max |Δlogit|), ``rel_error`` (‖Δ‖₂ / ‖ref‖₂ over all entries),
    ``top1_agreement`` (share of rows whose argmax agrees) and ``kl_ref_test``
    (mean over rows of KL(softmax(ref) ‖ softmax(test)), in nats).
    """
    ref, test = _t(ref), _t(test)
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
    diff = test - ref
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "max_abs_diff": float(diff.abs().max()),
        "rel_error": float(diff.norm() / ref.norm().clamp_min(1e-12)),
        "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).float().mean()),
        "kl_ref_test": float(kl.mean()),
        "positions": int(ref.shape[0]),
    }


def mean_nll(logits, ids) -> tuple[float, int]:
    """Mean negative log-likelihood (nats) of ``ids[1:]`` under ``logits[:-1]``; returns (nll, count).

    ``logits`` is ``(N, V)`` for the ``N`` positions of ``ids``; position ``t`` predicts ``ids[t+1]``.
    """
    logits = _t(logits)
    target = torch.as_tensor(np.asarray(ids[1:], dtype=np.int64))
    nll = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum")
    return float(nll) / max(1, len(target)), len(target)


def perplexity(logits, ids) -> float:
    """exp(mean NLL) of ``ids[1:]`` under ``logits[:-1]`` (one window)."""
    return float(np.exp(mean_nll(logits, ids)[0]))

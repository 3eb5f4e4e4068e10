"""Divergences between two categorical distributions given as log-probabilities.

Every function here takes the teacher's log-probabilities ``lp`` and the student's ``lq``, both
``(..., N)`` over the same ``N`` outcomes, and returns the divergence per row ``(...)``, summed over
the last axis. ``N`` is the vocabulary for dense targets, or ``K + 1`` buckets (top-k ids and one
tail bucket) for sparse targets (see :mod:`distillery.losses.sparse`). They are plain autograd
code: the reference the fused chunked path (:mod:`distillery.losses.kernels`) is tested against.

Notation: ``p = exp(lp)`` (teacher), ``q = exp(lq)`` (student), ``KL(a‖b) = Σ a (log a − log b)``.

* ``forward_kl``       KL(p‖q)
* ``reverse_kl``       KL(q‖p)
* ``jsd(β)``           β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q  (GKD eq. 1, TRL's
  ``generalized_jsd_loss``). β = 0 is *defined* as KL(p‖q) and β = 1 as KL(q‖p), exactly as TRL
  does: the formula itself tends to 0 at both ends (m → q, resp. m → p), with
  jsd(β)/β → KL(p‖q) as β → 0 and jsd(β)/(1−β) → KL(q‖p) as β → 1.
* ``skew_forward_kl(α)``  KL(p ‖ α·p + (1−α)·q)   (DistiLLM, Ko et al. 2024, "α-SKL")
* ``skew_reverse_kl(α)``  KL(q ‖ α·q + (1−α)·p)   (DistiLLM "α-SRKL")
  α = 0 gives the plain forward / reverse KL, α = 1 gives 0. DistiLLM's reference code
  (``distillm/losses.py``) mixes exactly so (``lam * teacher + (1 - lam) * student`` for SKL,
  ``(1 - lam) * teacher + lam * student`` for SRKL) but returns the cross-entropy −Σ p log m for
  SKL (no teacher-entropy term); ours is the true KL (≥ 0, 0 when the student equals the teacher).
  The gradients are identical.
* ``tvd``              ½·Σ |p − q|

Numerics: everything stays in log space; mixtures use ``logaddexp`` so ``log m`` is finite even
where both probabilities underflow, and ``p · (lp − lq)`` is 0 (not NaN) when ``p`` underflows,
as long as the log-probabilities are finite. Inputs are not scaled by any temperature here.
"""

from __future__ import annotations

import math

import torch

NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ_i a_i (log a_i − log b_i) over the last axis; ``(..., N), (..., N) -> (...)``."""
    return (la.exp() * (la - lb)).sum(-1)


def mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) elementwise, stable (``logaddexp``); ``0 < w < 1``."""
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def forward_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row ``(...)``."""
    return kl(lp, lq)


def reverse_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) per row ``(...)``."""
    return kl(lq, lp)


def jsd(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; β=0 → KL(p‖q), β=1 → KL(q‖p) exactly."""
    if beta == 0.0:
        return kl(lp, lq)
    if beta == 1.0:
        return kl(lq, lp)
    lm = mix(lp, lq, beta)
    return beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm)


def skew_forward_kl(lp: torch.Tensor, lq: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(p ‖ α·p + (1−α)·q); α=0 → KL(p‖q), α=1 → 0."""
    if alpha == 0.0:
        return kl(lp, lq)
    if alpha == 1.0:
        return (lq * 0.0).sum(-1)  # zeros, still attached to the graph
    return kl(lp, mix(lp, lq, alpha))


def skew_reverse_kl(lp: torch.Tensor, lq: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(q ‖ α·q + (1−α)·p); α=0 → KL(q‖p), α=1 → 0."""
    if alpha == 0.0:
        return kl(lq, lp)
    if alpha == 1.0:
        return (lq * 0.0).sum(-1)
    return kl(lq, mix(lq, lp, alpha))


def tvd(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """½·Σ |p − q| per row ``(...)`` (subgradient 0 where p == q, as ``abs`` has)."""
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


def check_params(name: str, beta: float, alpha: float) -> None:
    """Raise ``ValueError`` for an unknown divergence name or a mixture weight outside [0, 1]."""
    if name not in NAMES:
        raise ValueError(f"unknown divergence '{name}' (choose one of {', '.join(NAMES)})")
    if name == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if name.startswith("skew_") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name} alpha must lie in [0, 1], got {alpha}")


def apply(name: str, lp: torch.Tensor, lq: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Divergence ``name`` between log-probabilities ``lp`` (teacher) and ``lq`` (student) ``-> (...)``."""
    check_params(name, beta, alpha)
    if name == "forward_kl":
        return forward_kl(lp, lq)
    if name == "reverse_kl":
        return reverse_kl(lp, lq)
    if name == "jsd":
        return jsd(lp, lq, beta)
    if name == "skew_forward_kl":
        return skew_forward_kl(lp, lq, alpha)
    if name == "skew_reverse_kl":
        return skew_reverse_kl(lp, lq, alpha)
    return tvd(lp, lq)

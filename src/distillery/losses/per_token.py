"""Per-token losses ``(B, T)`` from student logits and a teacher, and the one ``reduce``.

Each KD function takes

* ``student_logits (B, T, V_s)``: raw (unscaled) student logits, already aligned with the targets;
* ``teacher``: raw teacher logits ``(B, T, V_t)`` or :class:`~distillery.targets.TeacherTargets`
  (dense logits, lazy hidden + LM head, or sparse top-k + tail, optionally with a sampled tail that
  forward KL uses, see :mod:`.sparse`);
* ``loss_temperature`` τ: both sides are softened, ``p = softmax(z_T / τ)``, ``q = softmax(z_S / τ)``.
  ``None`` = 1 for dense targets, the recorded τ for sparse ones (another τ raises);
* ``vocab_size``: compare only the first ``vocab_size`` columns of both (padded vocabularies);
* ``mask (B, T)`` bool: positions without a loss give exactly 0 (and a zero gradient). The teacher's
  own ``TeacherTargets.mask`` is combined with it.

and returns the divergence per position, summed over the vocabulary, in nats, ``(B, T)``. The
values are the divergences themselves: **no τ² factor** here (Hinton's τ² gradient scaling is applied
by the training objective, :func:`distillery.losses.chunked_distill_loss`, see the package docstring).
The maths is computed in fp32 (fp64 if the inputs are fp64). These functions materialise ``(B, T, V)``
log-probabilities: they are the reference and the tool for small vocabularies; training uses the
fused chunked path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..targets import TeacherTargets
from . import divergences, sparse
from .inputs import (LossInputError, as_targets, check_sparse_ids, combined_mask, compute_dtype, temperature,
                     vocab_width)


def teacher_student_logprobs(student_logits: torch.Tensor, teacher: TeacherTargets | torch.Tensor,
                             loss_temperature: float | None = None,
                             vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' log-probabilities on a common support: ``(lp, lq)``, each ``(B, T, N)``.

    Dense: ``N = V`` (``log_softmax`` of the first ``V`` columns / τ). Sparse: ``N = K + 1`` buckets
    (``N = K`` when K = V), see :mod:`.sparse`.
    """
    t = as_targets(teacher)
    v, tau, dtype, lq = _student_side(student_logits, t, loss_temperature, vocab_size)
    if t.is_sparse:
        check_sparse_ids(t.topk_ids, v)
        ids = t.topk_ids.long()
        return sparse.teacher_buckets(t.topk_logprobs, t.tail_logprob, v, dtype), sparse.student_buckets(lq, ids)
    tl = t.dense_logits().reshape(*student_logits.shape[:-1], -1)[..., :v]  # (B, T, V)
    return torch.log_softmax(tl.to(dtype) / tau, dim=-1), lq


def _student_side(student_logits: torch.Tensor, t: TeacherTargets, loss_temperature: float | None,
                  vocab_size: int | None):
    """Shape check, then ``(V, tau, compute dtype, student log-probs (B, T, V))`` for any target form."""
    if t.shape != tuple(student_logits.shape[:-1]):
        raise LossInputError(f"teacher targets cover positions {t.shape}, the student logits "
                             f"{tuple(student_logits.shape[:-1])}")
    v = vocab_width(student_logits.shape[-1], t, vocab_size)
    tau = temperature(t, loss_temperature)
    dtype = compute_dtype(student_logits)
    return v, tau, dtype, torch.log_softmax(student_logits[..., :v].to(dtype) / tau, dim=-1)


def _masked(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Exactly 0 outside ``mask`` (``where``, so nothing computed there reaches the value or gradient)."""
    if mask is None:
        return per_token
    return torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))


def divergence(name: str, student_logits: torch.Tensor, teacher: TeacherTargets | torch.Tensor, *,
               beta: float = 0.5, alpha: float = 0.1, loss_temperature: float | None = None,
               vocab_size: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KD loss ``name`` (one of ``divergences.NAMES``) ``(B, T)``; ``beta`` is used by
    ``jsd`` only and ``alpha`` by the skew KLs, so callers may pass both."""
    divergences.check_params(name, beta, alpha)
    t = as_targets(teacher)
    if t.is_sparse and t.n_samples and sparse.uses_samples(name, beta, alpha):
        per_token = _sampled_forward_kl(student_logits, t, loss_temperature, vocab_size)  # (B, T)
    else:  # dense, or the (K+1)-bucket rule (a sampled tail is ignored: see .sparse)
        lp, lq = teacher_student_logprobs(student_logits, t, loss_temperature, vocab_size)
        per_token = divergences.apply(name, lp, lq, beta=beta, alpha=alpha)  # (B, T)
    return _masked(per_token, combined_mask(mask, t))


def _sampled_forward_kl(student_logits: torch.Tensor, t: TeacherTargets, loss_temperature: float | None,
                        vocab_size: int | None) -> torch.Tensor:
    """Forward KL from top-k + sampled-tail targets ``(B, T)`` (:func:`.sparse.sampled_forward_kl`)."""
    v, _, dtype, lq = _student_side(student_logits, t, loss_temperature, vocab_size)
    check_sparse_ids(t.topk_ids, v)
    check_sparse_ids(t.sample_ids, v, what="sampled-tail")
    return sparse.sampled_forward_kl(t.topk_logprobs.to(dtype), lq.gather(-1, t.topk_ids.long()), t.tail_logprob,
                                     t.sample_logprobs, lq.gather(-1, t.sample_ids.long()), v)


def forward_kl(student_logits, teacher, *, loss_temperature=None, vocab_size=None, mask=None) -> torch.Tensor:
    """KL(p_T ‖ q_S) = Σ_v p_v (log p_v − log q_v) per token ``(B, T)``."""
    return divergence("forward_kl", student_logits, teacher, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def reverse_kl(student_logits, teacher, *, loss_temperature=None, vocab_size=None, mask=None) -> torch.Tensor:
    """KL(q_S ‖ p_T) = Σ_v q_v (log q_v − log p_v) per token ``(B, T)``."""
    return divergence("reverse_kl", student_logits, teacher, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def jsd(student_logits, teacher, *, beta=0.5, loss_temperature=None, vocab_size=None, mask=None) -> torch.Tensor:
    """Generalized JSD β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q, per token ``(B, T)``.

    TRL/GKD convention: β = 0 is exactly forward KL, β = 1 exactly reverse KL.
    """
    return divergence("jsd", student_logits, teacher, beta=beta, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def skew_forward_kl(student_logits, teacher, *, alpha=0.1, loss_temperature=None, vocab_size=None,
                    mask=None) -> torch.Tensor:
    """DistiLLM's α-skew KL: KL(p ‖ α·p + (1−α)·q) per token ``(B, T)``; α = 0 is forward KL."""
    return divergence("skew_forward_kl", student_logits, teacher, alpha=alpha, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def skew_reverse_kl(student_logits, teacher, *, alpha=0.1, loss_temperature=None, vocab_size=None,
                    mask=None) -> torch.Tensor:
    """DistiLLM's α-skew reverse KL: KL(q ‖ α·q + (1−α)·p) per token ``(B, T)``; α = 0 is reverse KL."""
    return divergence("skew_reverse_kl", student_logits, teacher, alpha=alpha, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def tvd(student_logits, teacher, *, loss_temperature=None, vocab_size=None, mask=None) -> torch.Tensor:
    """Total variation distance ½·Σ_v |p_v − q_v| per token ``(B, T)``."""
    return divergence("tvd", student_logits, teacher, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int | None = None) -> torch.Tensor:
    """−log softmax(z)[label] per token ``(B, T)`` over the first ``vocab_size`` columns; no temperature.

    ``labels (B, T)`` are already shifted; ``-100`` gives exactly 0 (and no gradient).
    """
    v = logits.shape[-1] if vocab_size is None else vocab_size
    if not 0 < v <= logits.shape[-1]:
        raise LossInputError(f"vocab_size={v} exceeds the logits' width {logits.shape[-1]}")
    z = logits[..., :v].to(compute_dtype(logits))
    flat = F.cross_entropy(z.reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="none")  # (B*T,)
    return flat.reshape(labels.shape)


def reduce(per_token: torch.Tensor, mask: torch.Tensor | None, n_tokens: float | int | torch.Tensor) -> torch.Tensor:
    """Σ_{mask} per_token / n_tokens: a scalar.

    ``n_tokens`` is the number of target tokens in the *whole* gradient-accumulation window (all
    micro-batches, all ranks), counted once by the training loop. Dividing every micro-batch's sum by
    that one number makes the accumulated gradient equal to the gradient of the window's token mean,
    so 4 micro-batches of 2 equal one batch of 8 (TRL #4719; a per-micro-batch mean would weight short
    micro-batches up). With no target tokens the masked sum is 0 and so is the result (the divisor is
    at least 1), never NaN; the result keeps its graph so ``backward()`` still works.
    """
    n = float(n_tokens)
    if n < 0:
        raise LossInputError(f"n_tokens must be >= 0, got {n}")
    return _masked(per_token, mask).sum() / max(n, 1.0)

"""Per-token divergences between teacher and student next-token distributions.

Every public loss takes student logits ``(B, T, V_s)`` and the teacher's signal — a logits tensor
``(B, T, V_t)`` or a :class:`~distillery.targets.TeacherTargets` — and returns per-token losses
``(B, T)`` summed over the vocabulary (nats). Positions outside ``mask`` are exactly 0.

Notation: ``p = softmax(z_T / τ)`` (teacher), ``q = softmax(z_S / τ)`` (student), ``τ`` =
``loss_temperature``.

* ``forward_kl``      KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)
* ``reverse_kl``      KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)
* ``jsd(beta)``       β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q  (TRL/GKD convention:
  β = 0 is exactly forward KL, β = 1 exactly reverse KL; in between JSD(β)/β → KL(p‖q) as β → 0
  and JSD(β)/(1−β) → KL(q‖p) as β → 1)
* ``skew_forward_kl(alpha)``  KL(p ‖ α·p + (1−α)·q)   (DistiLLM's SKL; α = 0 is forward KL)
* ``skew_reverse_kl(alpha)``  KL(q ‖ α·q + (1−α)·p)   (DistiLLM's SRKL; α = 0 is reverse KL)
* ``tvd``             ½ Σ_v |p_v − q_v|
* ``cross_entropy``   −log softmax(z_S)[label]  (no temperature)

**Temperature scaling.** The distributions are softened by ``τ`` and the KD losses are *not*
multiplied by τ² here: these functions return the divergence itself. The training loop multiplies
the KD term by τ² (Hinton et al.), which keeps gradient magnitudes comparable across temperatures
(``kd_scale = loss_temperature ** 2`` in :func:`chunked_distill_loss`).

**Sparse teachers (top-k + tail).** With sparse targets (ids ``(…, K)``, teacher log-probs at τ,
``tail = log(1 − Σ_k p_k)``), both distributions are collapsed onto the same K+1 outcomes: the K
kept tokens and one *tail bucket* holding all other tokens. The student's bucket is
``1 − Σ_k q_{id_k}``. Every divergence above is then evaluated on these (K+1)-way distributions.
For forward KL this is exact on the kept tokens and replaces the tail's Σ p_v log(p_v/q_v) by the
bucket term p_tail·log(p_tail/q_tail) (a lower bound of the true tail contribution, by the log-sum
inequality). Reverse KL, JSD, skew KLs and TVD are likewise computed over the K+1 buckets; for
them the tail bucket is an approximation whose error vanishes as the tail mass goes to 0, and with
K = V (empty tail) every sparse loss equals its dense counterpart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..targets import TeacherTargets

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


# ----------------------------------------------------------------------------- core maths on log-probs
def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) over the last axis from log-probs; 0·log 0 terms are 0 (``F.kl_div`` semantics)."""
    return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·P + (1−w)·Q), stable in log space."""
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


def divergence_from_logprobs(name: str, lp: torch.Tensor, lq: torch.Tensor, beta: float = 0.5,
                             alpha: float = 0.1) -> torch.Tensor:
    """Divergence ``name`` between teacher log-probs ``lp (…, N)`` and student log-probs ``lq (…, N)`` → ``(…)``."""
    if name == "forward_kl":
        return _kl(lp, lq)
    if name == "reverse_kl":
        return _kl(lq, lp)
    if name == "jsd":
        if beta == 0.0:
            return _kl(lp, lq)
        if beta == 1.0:
            return _kl(lq, lp)
        lm = _log_mix(lp, lq, beta)
        return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    if name == "skew_forward_kl":
        return _kl(lp, lq) if alpha == 0.0 else _kl(lp, _log_mix(lp, lq, alpha))
    if name == "skew_reverse_kl":
        return _kl(lq, lp) if alpha == 0.0 else _kl(lq, _log_mix(lq, lp, alpha))
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence '{name}' (choose one of {', '.join(KD_LOSSES)})")


# Floor for the tail buckets' log-mass (e^-80 ≈ 1.8e-35): an empty tail on both sides then
# contributes exactly 0 to every divergence, and no 0·log 0 or ∞ − ∞ appears.
TAIL_FLOOR = -80.0


def sparse_logprobs(student_lq: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor,
                    t_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse to K+1 buckets: (teacher ``(…, K+1)``, student ``(…, K+1)``) log-probs.

    ``student_lq`` are full student log-probs ``(…, V)``; ``ids (…, K)``, ``t_lp (…, K)``,
    ``t_tail (…)`` the sparse teacher. The last bucket is the tail. The student's tail is the
    log-sum-exp of its log-probs outside the kept ids (exact, unlike ``log(1 − Σ q_k)``, whose
    gradient blows up as Σ q_k → 1 in fp32).
    """
    s_k = student_lq.gather(-1, ids)  # (…, K)
    outside = student_lq.scatter(-1, ids, float("-inf"))  # (…, V)
    s_tail = torch.logsumexp(outside, dim=-1).clamp(min=TAIL_FLOOR)  # (…)
    lp = torch.cat([t_lp, t_tail.clamp(min=TAIL_FLOOR).unsqueeze(-1)], dim=-1)
    lq = torch.cat([s_k, s_tail.unsqueeze(-1)], dim=-1)
    return lp, lq


def teacher_student_logprobs(student_logits: torch.Tensor, teacher, loss_temperature: float = 1.0,
                             vocab_size: int | None = None, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of both sides on a common support: dense ``(…, V)`` or sparse ``(…, K+1)``.

    ``teacher`` is a logits tensor shaped like ``student_logits`` or a ``TeacherTargets``; with
    ``rows`` (flattened position indices) ``student_logits`` is ``(n, V)`` and the teacher's rows
    are taken from the targets.
    """
    v = vocab_size or None
    s = student_logits[..., :v] if v else student_logits
    lq = torch.log_softmax(_up(s) / loss_temperature, dim=-1)
    if isinstance(teacher, TeacherTargets) and teacher.is_sparse:
        if abs(teacher.loss_temperature - loss_temperature) > 1e-9:
            raise ValueError(f"sparse teacher targets were recorded at loss_temperature={teacher.loss_temperature}, "
                             f"not {loss_temperature}")
        if rows is None:
            ids, t_lp, tail = teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob
        else:
            ids, t_lp, tail = teacher.sparse_rows(rows)
        return sparse_logprobs(lq, ids.long(), t_lp.to(lq.dtype), tail.to(lq.dtype))
    if isinstance(teacher, TeacherTargets):
        t = teacher.dense_logits(rows) if rows is not None else teacher.dense_logits().reshape(
            *student_logits.shape[:-1], -1)
    else:
        t = teacher
    width = v or min(t.shape[-1], s.shape[-1])
    if t.shape[-1] != width or lq.shape[-1] != width:
        t, lq = t[..., :width], torch.log_softmax(_up(s[..., :width]) / loss_temperature, dim=-1)
    lp = torch.log_softmax(_up(t).to(lq.dtype) / loss_temperature, dim=-1)
    return lp, lq


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the softmax maths (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _masked(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return loss if mask is None else torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def divergence(name: str, student_logits: torch.Tensor, teacher, *, loss_temperature: float = 1.0,
               beta: float = 0.5, alpha: float = 0.1, vocab_size: int | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token divergence ``name`` ``(B, T)`` between teacher and student (see the module docstring)."""
    lp, lq = teacher_student_logprobs(student_logits, teacher, loss_temperature, vocab_size)
    if mask is None and isinstance(teacher, TeacherTargets):
        mask = teacher.mask
    return _masked(divergence_from_logprobs(name, lp, lq, beta=beta, alpha=alpha), mask)


def forward_kl(student_logits, teacher, *, loss_temperature=1.0, vocab_size=None, mask=None) -> torch.Tensor:
    """KL(p_T ‖ q_S) per token, ``(B, T)``."""
    return divergence("forward_kl", student_logits, teacher, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def reverse_kl(student_logits, teacher, *, loss_temperature=1.0, vocab_size=None, mask=None) -> torch.Tensor:
    """KL(q_S ‖ p_T) per token, ``(B, T)``."""
    return divergence("reverse_kl", student_logits, teacher, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def jsd(student_logits, teacher, *, beta=0.5, loss_temperature=1.0, vocab_size=None, mask=None) -> torch.Tensor:
    """Generalized JSD β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q, per token ``(B, T)``."""
    return divergence("jsd", student_logits, teacher, beta=beta, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def skew_forward_kl(student_logits, teacher, *, alpha=0.1, loss_temperature=1.0, vocab_size=None,
                    mask=None) -> torch.Tensor:
    """KL(p ‖ α·p + (1−α)·q) per token ``(B, T)`` (DistiLLM SKL)."""
    return divergence("skew_forward_kl", student_logits, teacher, alpha=alpha, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def skew_reverse_kl(student_logits, teacher, *, alpha=0.1, loss_temperature=1.0, vocab_size=None,
                    mask=None) -> torch.Tensor:
    """KL(q ‖ α·q + (1−α)·p) per token ``(B, T)`` (DistiLLM SRKL)."""
    return divergence("skew_reverse_kl", student_logits, teacher, alpha=alpha, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def tvd(student_logits, teacher, *, loss_temperature=1.0, vocab_size=None, mask=None) -> torch.Tensor:
    """Total variation ½ Σ |p − q| per token ``(B, T)``."""
    return divergence("tvd", student_logits, teacher, loss_temperature=loss_temperature,
                      vocab_size=vocab_size, mask=mask)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int | None = None) -> torch.Tensor:
    """−log q_S(label) per token ``(B, T)`` (labels already shifted; −100 gives 0)."""
    s = student_logits[..., :vocab_size] if vocab_size else student_logits
    flat = F.cross_entropy(_up(s).reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return flat.reshape(labels.shape)


def reduce(per_token: torch.Tensor, mask: torch.Tensor | None, n_tokens: float) -> torch.Tensor:
    """Σ over masked positions / ``n_tokens`` (the target count of the whole accumulation window, all ranks).

    Dividing once by the window's count (not per micro-batch) makes 4 micro-batches of 2 give the
    same gradient as one batch of 8 (TRL #4719). An all-masked input gives 0, never NaN.
    """
    total = _masked(per_token, mask).sum()
    return total / max(float(n_tokens), 1.0)

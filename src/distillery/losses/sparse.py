"""Sparse teachers: top-k ids + log-probabilities + one tail bucket, and the rule for every divergence.

A sparse target for one position is ``ids (K,)``, ``lp (K,)`` = the teacher's log-probabilities of
those ids at the recorded ``loss_temperature`` τ, and ``tail = log(1 − Σ_k p_k)``, the log of the
mass on every other token. It does not say how that mass is spread, so the loss is computed on the
**(K+1)-bucket coarse-graining of both distributions**: bucket k is token ``ids[k]``, bucket K+1
("tail") is every token not in ``ids``.

    teacher  P = (p_1 … p_K, p_tail)          p_k = exp(lp_k),  p_tail = exp(tail)
    student  Q = (q_{ids_1} … q_{ids_K}, q_tail)   q = softmax(z / τ) over the vocabulary,
             q_tail = Σ_{v ∉ ids} q_v   (computed as a log-sum-exp over those columns: exact, no
             1 − Σ cancellation, and a finite gradient however close Σ_k q_k is to 1)

and ``D_sparse = D(P, Q)`` with the same formula as the dense ``D`` (:mod:`.divergences`) applied to
the K+1 buckets. Hence:

* forward KL  = Σ_k p_k (lp_k − log q_k) + p_tail (log p_tail − log q_tail): exact on the kept ids;
  the tail term is a lower bound of the dense tail contribution (log-sum inequality).
* reverse KL  = Σ_k q_k (log q_k − lp_k) + q_tail (log q_tail − log p_tail)
* jsd(β), skew KLs: the mixtures m are formed bucket by bucket (m_tail = β·p_tail + (1−β)·q_tail …)
* tvd         = ½ (Σ_k |p_k − q_k| + |p_tail − q_tail|)

Every coarse-grained f-divergence is ≤ the dense one (data-processing inequality), with equality
when the tail is empty. Two edge rules:

* **K = V** (every vocabulary column kept): there is no tail bucket on either side; the recorded
  tail is only fp32 rounding of 1 − Σ p and is ignored. The sparse loss then equals the dense loss
  (value and gradient) up to summation order.
* **Empty recorded tail** (``tail = −1e30``, the convention of ``sparse_from_logits`` and the cache
  for Σ_k p_k ≥ 1) with K < V: the teacher's tail log-mass is floored at ``TAIL_FLOOR`` = log of the
  smallest normal fp32 (≈ −87.34, mass 1.2e−38), the ``log(max(1 − Σ, tiny))`` of ``TeacherTargets``'
  docstring. Forward-type terms p_tail(…) are then 0 and reverse-type terms q_tail(log q_tail + 87.3)
  stay finite while still pushing the student's tail mass to 0.

Ids must be distinct within a row (top-k ids are).

**Sampled tail** (``TeacherTargets.sample_ids``/``sample_logprobs``, ``M`` draws per position from
the teacher's tail distribution ``p_v / p_tail``, v ∉ ids, see :func:`distillery.targets.sample_tail`):

* **forward KL** (and the names that are exactly forward KL: ``jsd`` with β = 0, ``skew_forward_kl``
  with α = 0) uses them: the top-k terms exactly plus an importance-sampled estimate of the tail term,

      KL_sampled = Σ_k p_k (lp_k − log q_{ids_k}) + p_tail · (1/M) Σ_j (lp_{s_j} − log q_{s_j})

  Its expectation over the draws is the dense ``Σ_v p_v (log p_v − log q_v)``, and so is the
  expectation of its gradient w.r.t. the student's logits (``∂/∂s_v = q_v (Σ_k p_k + p_tail) − p_v``
  on the top-k, ``q_v (Σ_k p_k + p_tail) − (p_tail/M)·#{j: s_j = v}`` elsewhere, whose mean is
  ``q_v − p_v``). One position's value is noisy and can be negative; means over many positions
  converge to the dense loss. The gradient does not depend on the stored ``lp_{s_j}`` at all (they
  only make the value a KL rather than a cross-entropy), so their encoding error never reaches training.
* **every other divergence** (reverse KL, JSD with β > 0, the skew KLs with α > 0, TVD) ignores the
  draws and uses the (K+1)-bucket rule above on the top-k and the tail bucket, exactly as for a
  cache without samples. (Reverse-type terms weigh the tail by the *student's* q, which draws from
  the teacher's p cannot estimate without importance weights q/p that blow up where the student puts
  mass the teacher does not: the very region reverse KL is meant to punish.)
* K = V or an empty tail: the tail term is 0 (the draws carry weight p_tail = 0) and the value is the
  plain top-k sum.

To use the tail bucket for forward KL too, drop the draws: ``TeacherTargets.without_samples()``
(or ``CachedTeacher(..., tail="bucket")``).
"""

from __future__ import annotations

import math

import torch

TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # ≈ -87.34


def has_tail(k: int, vocab: int) -> bool:
    """Whether the tail bucket exists: some vocabulary column is outside the K kept ids."""
    return k < vocab


def teacher_buckets(lp: torch.Tensor, tail: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Teacher log-probabilities over the buckets: ``(…, K), (…) -> (…, K+1)``, or ``(…, K)`` when K = V."""
    lp = lp.to(dtype)
    if not has_tail(lp.shape[-1], vocab):
        return lp
    return torch.cat([lp, tail.to(dtype).clamp(min=TAIL_FLOOR).unsqueeze(-1)], dim=-1)


def student_buckets(lq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student log-probabilities over the buckets from full log-probs ``lq (…, V)`` and ``ids (…, K)``.

    Returns ``(…, K+1)`` (last = tail, ``logsumexp`` of ``lq`` outside ``ids``), or ``(…, K)`` when K = V.
    Plain autograd: this is the reference the fused path's hand-written gradient is tested against.
    """
    kept = lq.gather(-1, ids)  # (…, K)
    if not has_tail(ids.shape[-1], lq.shape[-1]):
        return kept
    outside = lq.scatter(-1, ids, float("-inf"))  # (…, V), -inf at the kept ids
    return torch.cat([kept, torch.logsumexp(outside, dim=-1, keepdim=True)], dim=-1)


def uses_samples(name: str, beta: float = 0.5, alpha: float = 0.1) -> bool:
    """Whether divergence ``name`` uses a sampled tail: forward KL and its exact aliases only."""
    return name == "forward_kl" or (name == "jsd" and beta == 0.0) or (name == "skew_forward_kl" and alpha == 0.0)


def sampled_forward_kl(lp: torch.Tensor, lq_top: torch.Tensor, tail: torch.Tensor, lp_s: torch.Tensor,
                       lq_s: torch.Tensor, vocab: int) -> torch.Tensor:
    """Forward KL with a sampled tail (module docstring): ``(…, K), (…, K), (…), (…, M), (…, M) -> (…)``.

    ``lp``/``lq_top``: teacher / student log-probs at the top-k ids; ``tail``: the teacher's log tail
    mass; ``lp_s``/``lq_s``: teacher / student log-probs at the ``M`` drawn ids. Differentiable in the
    student's log-probs (plain autograd: the reference for the fused kernel).
    """
    head = (lp.exp() * (lp - lq_top)).sum(-1)
    if not has_tail(lp.shape[-1], vocab) or lp_s.shape[-1] == 0:
        return head
    w = tail.to(lq_top.dtype).clamp(min=TAIL_FLOOR).exp() / lp_s.shape[-1]  # (…) weight of one draw
    return head + w * (lp_s.to(lq_top.dtype) - lq_s).sum(-1)

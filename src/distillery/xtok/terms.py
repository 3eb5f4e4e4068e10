"""Row-wise cross-tokenizer divergences: teacher rows in the teacher's vocabulary, student rows in the student's.

Notation per row (one aligned position): ``lp (V_t,)`` teacher log-probs, ``lq (V_s,)`` student log-probs (both at the
loss temperature τ), ``p = exp(lp)``, ``q = exp(lq)``; the vocabulary map (:mod:`.vocab_map`) pairs teacher ids
``T_i`` with student ids ``S_i`` (i = 1..M). Everything is plain autograd on ``(c, V)`` chunks; the callers
(:mod:`.losses`) gather the rows and bound memory.

* :func:`matched_kl` — **exact-string KL with a tail bucket** (``exact_kl``): both distributions coarse-grained to
  the M matched strings plus one bucket holding each side's unmatched mass,

      KL = Σ_i p_{T_i} (log p_{T_i} − log q_{S_i}) + p_rest (log p_rest − log q_rest),
      p_rest = Σ_{v ∉ T} p_v,  q_rest = Σ_{v ∉ S} q_v   (log-sum-exp, floored at log(tiny fp32) like
      :mod:`distillery.losses.sparse`).

  It is a forward KL between two distributions on the same M + 1 outcomes (≥ 0, 0 iff they agree there). With
  identical tokenizers (M = V, no rest on either side) it *is* the same-vocabulary ``forward_kl``.
* :func:`uld` — **ULD** (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss", arXiv:2402.12030): ``Σ_k |p_(k) − q_(k)|``, the L1 distance of the two probability vectors each
  sorted in decreasing order and zero-padded to ``max(V_t, V_s)`` (a closed form of the Wasserstein-1 distance under
  their uniform-cost assumption). Token identity plays no part.
* :func:`gold_hybrid` — **GOLD's hybrid ULD** (TRL ``trl/experimental/gold/gold_trainer.py``,
  ``ULDLoss._compute_hybrid_uld_loss``; Patiño et al. 2025, "Unlocking On-Policy Distillation for Any Model Family"):

      w_m · JSD_β(p_T, q_S) + w_u · Σ_k |sort(p_{∉T})_k − sort(q_{∉S})_k|,

  ``JSD_β(a, b) = β·KL(a‖m) + (1−β)·KL(b‖m)``, ``m = β·a + (1−β)·b`` on the *unnormalised* matched probabilities
  with logs clamped at ``log 1e-8`` (TRL's ``generalized_jsd_loss(..., logits_are_probs=True)``; β = 0 is KL(a‖b),
  β = 1 is KL(b‖a)); the unmatched parts are sorted, zero-padded and compared in L1. TRL's default weights are
  adaptive: ``w_m = M / V_t``, ``w_u = 1 − w_m``. (TRL matches raw vocabulary strings, so ``Ġthe`` never meets
  ``▁the``; here the match is on bytes.)
* :func:`span_binary_kl` — the **span term** for a span of several tokens on one side (chain rule): with the
  teacher's span log-probability ``a = Σ log p(teacher tokens)`` and the student's ``b = Σ log q(student tokens)``,
  the KL of the two Bernoulli distributions over {the span's string, anything else}:

      p_a (a − b) + (1 − p_a)(log(1 − p_a) − log(1 − q_b)),   p_a = e^a, q_b = e^b,

  with ``a, b`` clamped to ``≤ log(1 − 1e-6)`` so the second term stays finite. Its gradient raises the student's
  span likelihood where the teacher is more confident and lowers it where the teacher is less.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..losses.sparse import TAIL_FLOOR

GOLD_LOG_CLAMP = math.log(1e-8)  # TRL clamps probabilities at 1e-8 before the log
SPAN_MAX_LOGPROB = math.log1p(-1e-6)


def _xlogy_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``p (lp − lq)`` elementwise, exactly 0 where ``p = 0`` (``lp = −inf``), so no NaN reaches the sum."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=lq.dtype, device=lq.device))


def matched_kl(lq: torch.Tensor, ids: torch.Tensor, lp_ids: torch.Tensor, lp_rest: torch.Tensor) -> torch.Tensor:
    """Exact-string KL with a tail bucket (module docstring): ``(c, V_s), ids, (c, K), (c,) -> (c,)``.

    ``ids``: the student ids carrying teacher mass, ``(K,)`` shared by all rows (a dense teacher: all M matched ids)
    or ``(c, K)`` per row with ``-1`` for entries that have no student counterpart (a sparse teacher, whose
    unmatched entries are already folded into ``lp_rest``). ``lp_ids``: the teacher's log-probs of those entries;
    ``lp_rest``: the log of the teacher's mass everywhere else. Ids must be distinct within a row.
    """
    if ids.dim() == 1:
        lq_ids = lq.index_select(-1, ids)  # (c, K)
        matched = torch.zeros(lq.shape[-1], dtype=torch.bool, device=lq.device)
        matched[ids] = True
        valid = None
    else:
        valid = ids >= 0
        safe = ids.clamp(min=0)
        lq_ids = lq.gather(-1, safe)
        matched = torch.zeros(lq.shape, dtype=torch.int32, device=lq.device).scatter_add_(-1, safe, valid.int()) > 0
    lq_rest = lq.masked_fill(matched, float("-inf")).logsumexp(-1).clamp(min=TAIL_FLOOR)  # (c,)
    head = _xlogy_terms(lp_ids.to(lq.dtype), lq_ids)
    if valid is not None:
        head = torch.where(valid, head, torch.zeros((), dtype=head.dtype, device=head.device))
    lp_rest = lp_rest.to(lq.dtype).clamp(min=TAIL_FLOOR)
    return head.sum(-1) + lp_rest.exp() * (lp_rest - lq_rest)


def _sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_k |sort(a)_k − sort(b)_k|`` over the last axis, both sorted decreasingly and zero-padded: ``(c, ·) -> (c,)``."""
    a = a.sort(dim=-1, descending=True).values
    b = b.sort(dim=-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    a = F.pad(a, (0, width - a.shape[-1]))
    b = F.pad(b, (0, width - b.shape[-1]))
    return (a - b).abs().sum(-1)


def uld(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """ULD (module docstring): ``(c, V_t), (c, V_s) -> (c,)``."""
    return _sorted_l1(lp.exp().to(lq.dtype), lq.exp())


def gold_jsd(pa: torch.Tensor, pb: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD on probability inputs (``logits_are_probs=True``): ``(c, M), (c, M) -> (c,)``.

    ``a`` is the teacher, ``b`` the student; logs are ``log(clamp(·, 1e-8))`` and the KL weights are the clamped
    probabilities, exactly as ``F.kl_div(..., log_target=True)`` computes them there.
    """
    la = pa.clamp_min(1e-8).log()
    lb = pb.clamp_min(1e-8).log()
    if beta == 0.0:
        return (la.exp() * (la - lb)).sum(-1)
    if beta == 1.0:
        return (lb.exp() * (lb - la)).sum(-1)
    lm = torch.logaddexp(lb + math.log1p(-beta), la + math.log(beta))
    return beta * (la.exp() * (la - lm)).sum(-1) + (1.0 - beta) * (lb.exp() * (lb - lm)).sum(-1)


def gold_hybrid(lp: torch.Tensor, lq: torch.Tensor, teacher_ids: torch.Tensor, student_ids: torch.Tensor,
                beta: float = 0.5, weights: tuple[float, float] | None = None) -> torch.Tensor:
    """GOLD's hybrid (module docstring): ``(c, V_t), (c, V_s), (M,), (M,) -> (c,)``.

    ``weights = (w_m, w_u)``; ``None`` = TRL's adaptive ``(M / V_t, 1 − M / V_t)``.
    """
    p, q = lp.exp().to(lq.dtype), lq.exp()
    if weights is None:
        w_m = teacher_ids.numel() / max(1, lp.shape[-1])
        weights = (w_m, 1.0 - w_m)
    matched = gold_jsd(p.index_select(-1, teacher_ids), q.index_select(-1, student_ids), beta)
    t_rest = torch.ones(p.shape[-1], dtype=torch.bool, device=p.device)
    t_rest[teacher_ids] = False
    s_rest = torch.ones(q.shape[-1], dtype=torch.bool, device=q.device)
    s_rest[student_ids] = False
    if bool(t_rest.any()) and bool(s_rest.any()):
        unmatched = _sorted_l1(p[:, t_rest], q[:, s_rest])
    else:  # TRL skips the unmatched term when either side has nothing unmatched
        unmatched = torch.zeros_like(matched)
    return weights[0] * matched + weights[1] * unmatched


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, stable on both sides of ``−ln 2``."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_binary_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bernoulli KL over {span, rest} (module docstring): teacher span log-prob ``a``, student ``b`` -> same shape."""
    a = a.to(b.dtype).clamp(max=SPAN_MAX_LOGPROB)
    b = b.clamp(max=SPAN_MAX_LOGPROB)
    return a.exp() * (a - b) + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b))

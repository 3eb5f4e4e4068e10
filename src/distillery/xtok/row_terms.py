"""The row terms of the fused cross-tokenizer path (:mod:`.fused`), one chunk of rows at a time, written in place
over the student's logits so that no ``(rows, V)`` autograd graph exists: each returns the rows' values and leaves
``∂L/∂s`` (``s = z / τ``) where the logits were.

``exact_kl`` by hand (:func:`~.terms.matched_kl`, floors at ``TAIL_FLOOR``): with ``p`` the teacher's matched
probabilities, ``P_r = exp(max(lp_rest, floor))`` and ``Q_r = Σ_{j ∉ S} q_j``, the row value is
``Σ_i p_i (lp_i − lq_i) + P_r (lp_rest − max(log Q_r, floor))``, ``G_i = −p_i`` on the matched columns and
``G_rest = −P_r`` on ``log Q_r`` (0 when the floor is active, as autograd of ``clamp`` gives), so

    ∂L/∂s_j = q_j·S − p_j  (j matched),   q_j·(S − P_r / Q_r)  (j unmatched),   S = Σ_i p_i + P_r·[log Q_r ≥ floor].

Sparse teachers (``exact_kl`` only; cached or served top-k, or :func:`~.student_targets.student_side_loss`) keep
the vocabulary order: each row's matched ids ``(c, K)`` (``-1`` = none) are scattered into a scratch copy of the
logits with one extra dummy column that absorbs the ``-1`` entries.
"""

from __future__ import annotations

import torch

from ..losses.sparse import TAIL_FLOOR
from . import terms


def lse(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Row log-sum-exp ``(k, n) -> (k, 1)``; ``-inf`` for an empty row. ``work``: a flat scratch of at least ``k·n``
    elements for the ``exp`` (torch.logsumexp's own steps: max, exp of the difference, sum, log), so no ``(k, n)``
    temporary is allocated. Why: ``k`` differs at every step's last chunk, and temporaries of ever new sizes in the
    MB range fragmented the heap (``benchmarks/xtok_memory.py shapes``)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0], 1), float("-inf"))
    if work is None or work.numel() < x.numel():
        return torch.logsumexp(x, dim=1, keepdim=True)
    big = x.amax(1, keepdim=True)
    big = torch.where(big.abs() == float("inf"), torch.zeros_like(big), big)
    e = torch.sub(x, big, out=work[:x.numel()].view(x.shape)).exp_()
    return e.sum(1, keepdim=True).log_().add_(big)


def exact_kl_dense_(z: torch.Tensor, t: torch.Tensor, m: int, p: torch.Tensor,
                     lam: float = 0.0, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row values ``(k,)`` and the student's ``logsumexp`` ``(k, 1)``; ``z (k, V_s)`` (student logits / τ, matched
    first) becomes ``∂L/∂s`` plus ``lam · q`` (the CE term's ``q``, its ``−lam`` at the label is the caller's).
    ``t (k, V_t)`` (teacher logits / τ, matched first) and ``p (k, M)`` are scratch, ``work`` as in :func:`lse`."""
    big_t = lse(t, work)
    lp_rest = (lse(t[:, m:], work) - big_t).clamp(min=TAIL_FLOOR)  # (k, 1)
    lp = t[:, :m].sub_(big_t)  # teacher matched log-probs, in place
    torch.exp(lp, out=p)
    big = lse(z, work)
    lq_rest_raw = lse(z[:, m:], work) - big
    lq_rest = lq_rest_raw.clamp(min=TAIL_FLOOR)
    d = lp.sub_(z[:, :m]).add_(big).mul_(p)  # p (lp − lq), lq = z − lse(z)
    d.masked_fill_(p == 0, 0.0)  # p = 0 (lp = −inf) contributes exactly 0, not 0·inf
    p_rest = lp_rest.exp()
    value = d.sum(1) + (p_rest * (lp_rest - lq_rest)).squeeze(1)
    live = lq_rest_raw >= TAIL_FLOOR  # the floor passes no gradient
    s_total = p.sum(1, keepdim=True) + torch.where(live, p_rest, torch.zeros_like(p_rest)) + lam
    rest_coef = s_total - torch.where(live, p_rest * torch.exp(-lq_rest), torch.zeros_like(p_rest))
    q = z.sub_(big).exp_()
    q[:, :m].mul_(s_total).sub_(p)
    q[:, m:].mul_(rest_coef)
    return value, big


def exact_kl_sparse_(z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, rest: torch.Tensor,
                      scratch: torch.Tensor, lam: float = 0.0,
                      work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row values ``(k,)`` and the student's ``logsumexp`` ``(k, 1)``; ``∂L/∂s`` (plus ``lam · q``, as in
    :func:`exact_kl_dense_`) is written into ``scratch[:, :V]``. ``z (k, V)`` the student logits / τ,
    ``ids (k, K)`` student ids or ``-1``, ``lp (k, K)``, ``rest (k,)`` the teacher's log-mass elsewhere."""
    v = z.shape[1]
    valid = ids >= 0
    col = torch.where(valid, ids.long(), torch.full_like(ids.long(), v))  # -1 -> the dummy column v
    big = lse(z, work)
    scratch[:, :v].copy_(z)
    scratch[:, v] = float("-inf")
    scratch.scatter_(1, col, float("-inf"))
    lq_rest_raw = lse(scratch, work) - big  # Σ over the columns no matched id names
    lq_rest = lq_rest_raw.clamp(min=TAIL_FLOOR)
    lp = lp.to(z.dtype)
    lq_ids = z.gather(1, col.clamp(max=v - 1)) - big
    p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    head = torch.where(p > 0, p * (lp - lq_ids), torch.zeros_like(lp)).sum(1)
    lp_rest = rest.to(z.dtype).clamp(min=TAIL_FLOOR).unsqueeze(1)
    p_rest = lp_rest.exp()
    value = head + (p_rest * (lp_rest - lq_rest)).squeeze(1)
    live = lq_rest_raw >= TAIL_FLOOR
    s_total = p.sum(1, keepdim=True) + torch.where(live, p_rest, torch.zeros_like(p_rest)) + lam
    rest_coef = s_total - torch.where(live, p_rest * torch.exp(-lq_rest), torch.zeros_like(p_rest))
    out = scratch
    torch.sub(z, big, out=out[:, :v]).exp_()  # q
    q_ids = out[:, :v].gather(1, col.clamp(max=v - 1))
    out[:, :v].mul_(rest_coef)
    # matched columns: q·S − p instead of q·(S − P_r/Q_r); the dummy column takes the -1 entries' additions
    out.scatter_add_(1, col, torch.where(valid, q_ids * (s_total - rest_coef) - p, torch.zeros_like(p)))
    return value, big


def autograd_term_(method: str, z: torch.Tensor, t: torch.Tensor, m: int, beta: float, gold_weights,
                    row_weight: torch.Tensor | None, lam: torch.Tensor | float = 0.0,
                    cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``uld`` / ``gold`` rows: ``G`` from autograd on this chunk's ``lq`` only; ``z`` becomes ``∂L/∂s`` plus
    ``lam · q`` (``lam`` already row-weighted). Returns the row values and, given label ``cols (k, 1)``, the
    student's ``−lq`` at the label (the CE rows)."""
    lp = torch.log_softmax(t, dim=1)
    torch.log_softmax(z, dim=1, out=z)
    ce = None if cols is None else -z.gather(1, cols).squeeze(1)
    with torch.enable_grad():
        lq = z.detach().requires_grad_(True)
        if method == "uld":
            value = terms.uld(lp, lq)
        else:
            ids = torch.arange(m, device=z.device)
            value = terms.gold_hybrid(lp, lq, ids, ids, beta, gold_weights)
        (g,) = torch.autograd.grad(value, lq, grad_outputs=row_weight.reshape(-1) if row_weight is not None
                                   else torch.ones_like(value))
    q = z.exp_()
    q.mul_(lam - g.sum(1, keepdim=True)).add_(g)
    return value.detach(), ce

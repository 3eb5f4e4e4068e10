"""In-place row kernels of the fused loss: per-row divergence and its gradient w.r.t. the student's logits.

The fused path (:mod:`.chunked`) holds one chunk of ``c`` rows at a time in a few reusable
``(c, V)`` buffers and computes each loss *and its gradient* with in-place tensor ops, so no
``(c, V)`` temporary is allocated per chunk (on CPU every such allocation is an ``mmap`` plus a page
fault per 4 KiB, which cost more than the maths). Autograd is not used for the dense divergences.

Notation per row: student ``s = z / τ``, ``lq = log_softmax(s)``, ``q = exp(lq)``; teacher ``lp``,
``p``. For a loss ``L(lq)`` let ``G_j = ∂L/∂lq_j`` (log-probs as free coordinates); since
``∂lq_i/∂s_j = δ_ij − q_j`` the gradient is ``∂L/∂s_j = G_j − q_j·Σ_i G_i`` and ``∂L/∂z = ∂L/∂s / τ``.

=================  ===================================================  ===============================
divergence         G_j                                                  ∂L/∂s_j
=================  ===================================================  ===============================
forward KL         −p_j                                                 q_j·Σp − p_j
reverse KL         q_j (a_j + 1),  a = lq − lp                           q_j (a_j + 1 − L − Σq)
jsd(β)             (1−β) q_j d_j,  d = lq − lm, m = βp + (1−β)q          (1−β) q_j (d_j − Σ_i q_i d_i)
skew fwd KL(α)     −(1−α) w_j,  w = p·q/m, m = αp + (1−α)q               (1−α)(q_j·Σw − w_j)
skew rev KL(α)     q_j (a_j + 1),  a = d − α·q/m, m = αq + (1−α)p        q_j (a_j + 1 − Σ q a − Σq)
tvd                ½ q_j sign(q_j − p_j)                                G_j − q_j ΣG
cross-entropy      −[j = y]   (at τ = 1)                                q_j − [j = y]
=================  ===================================================  ===============================

(For JSD ``∂L/∂q_j = (1−β)(lq_j − lm_j)``: the two ``1/m`` terms cancel. Σp and Σq are used as
computed, not assumed 1, so the result matches autograd of the reference to rounding.) Row values
are sums of one elementwise product (``sum``'s cascade summation): in fp32 they are as close to an
fp64 reference as the materialised fp32 path is (a ``bmm`` dot product would lose ~1e-5 at V = 49k).

Sparse targets: the student's K+1 bucket log-probs ``lQ`` (kept ids and the tail, :mod:`.sparse`)
are tiny ``(c, K+1)`` tensors, so the bucket divergence and ``G = ∂L/∂lQ`` come from autograd on
them; the map back to the vocabulary is analytic: with ``lQ_k = lq_{id_k}`` and
``lQ_tail = logsumexp_{v ∉ ids} lq_v``,
``∂L/∂s_j = [j = id_k]·G_k + [j ∉ ids]·G_tail·q_j/Q_tail − q_j·Σ_b G_b``.

Sparse targets with a sampled tail, forward KL (:func:`sampled_forward_kl_`): ``G`` is ``−p_k`` at
the top-k ids and ``−p_tail/M`` at each draw (repeated draws add up), so
``∂L/∂s_j = q_j·(Σ_k p_k + p_tail) − [j = id_k]·p_k − (p_tail/M)·#{draws = j}``.
"""

from __future__ import annotations

import math

import torch

from . import divergences, sparse


def log_softmax_(z: torch.Tensor, q: torch.Tensor) -> None:
    """In place: ``z (c, V)`` becomes ``log_softmax(z)`` and ``q = exp(z)`` its probabilities
    (torch's fused row kernel writing over its input, then one ``exp`` pass)."""
    torch.log_softmax(z, dim=1, out=z)
    torch.exp(z, out=q)


def cross_entropy_(z: torch.Tensor, y: torch.Tensor, out: torch.Tensor, coef: float) -> torch.Tensor:
    """CE rows ``lse(z) − z_y`` ``(c,)`` at τ = 1 from raw logits ``z`` (left intact); sets
    ``out = coef·(softmax(z) − onehot(y))``, its gradient."""
    m = z.amax(dim=1, keepdim=True)
    torch.sub(z, m, out=out)
    out.exp_()
    total = out.sum(dim=1, keepdim=True)
    ce = (m + total.log()).view(-1) - z.gather(1, y.unsqueeze(1)).view(-1)
    out.mul_(coef / total)
    if coef != 0.0:
        out.scatter_add_(1, y.unsqueeze(1), torch.full_like(m, -coef))
    return ce


def cross_entropy_from_logprobs_(lq: torch.Tensor, q: torch.Tensor, y: torch.Tensor, out: torch.Tensor,
                                 coef: float) -> torch.Tensor:
    """CE rows ``−lq_y`` when the τ = 1 log-probs are at hand; sets ``out = coef·(q − onehot(y))``."""
    ce = -lq.gather(1, y.unsqueeze(1)).view(-1)
    torch.mul(q, coef, out=out)
    if coef != 0.0:
        out.scatter_add_(1, y.unsqueeze(1), torch.full((y.numel(), 1), -coef, dtype=out.dtype, device=out.device))
    return ce


def _log1p_exp_mix_(x: torch.Tensor, w: float) -> None:
    """In place ``x ← log(w + (1−w)·e^x)`` (``logaddexp``: finite for any finite ``x``)."""
    x.add_(math.log1p(-w))
    torch.logaddexp(x, torch.tensor(math.log(w), dtype=x.dtype, device=x.device), out=x)


def dense_kd_(name: str, lq: torch.Tensor, q: torch.Tensor, lp: torch.Tensor, p: torch.Tensor,
              out: torch.Tensor, coef: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """Divergence rows ``(c,)``; adds ``coef·∂L/∂s`` to ``out`` (``coef (c, 1)``).

    ``lq, q, lp, p`` are ``(c, V)`` buffers of both sides' log-probs and probs; all four are
    clobbered. Mixtures are formed from the log-ratio ``r = lq − lp`` (``log m − lp =
    log(β + (1−β)e^r)``), so each row value is one product summed by ``sum`` (cascade summation,
    as accurate as the reference; a ``bmm`` dot product loses ~1e-5 at V = 49k in fp32).
    """
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    if name.startswith("skew_") and alpha == 0.0:
        name = "forward_kl" if name == "skew_forward_kl" else "reverse_kl"
    if name.startswith("skew_") and alpha == 1.0:  # m = the first argument: the divergence is 0
        return torch.zeros(lq.shape[0], dtype=lq.dtype, device=lq.device)

    if name == "forward_kl":
        loss = lp.sub_(lq).mul_(p).sum(dim=1)  # Σ p (lp − lq)
        q.mul_(p.sum(dim=1, keepdim=True)).sub_(p)  # q·Σp − p
        out.addcmul_(q, coef)
    elif name == "reverse_kl":
        lq.sub_(lp)  # a = lq − lp
        loss = torch.mul(q, lq, out=p).sum(dim=1)
        lq.sub_(loss.unsqueeze(1) + q.sum(dim=1, keepdim=True) - 1.0).mul_(q)
        out.addcmul_(lq, coef)
    elif name == "jsd":  # m = βp + (1−β)q
        torch.sub(lq, lp, out=lp)  # r = lq − lp
        torch.neg(lp, out=lq)
        _log1p_exp_mix_(lq, 1.0 - beta)  # log((1−β) + β e^−r) = lm − lq
        lq.neg_()  # d = lq − lm
        kl_pm = -lp.sub_(lq).mul_(p).sum(dim=1)  # lm − lp = r − d
        kl_qm = torch.mul(q, lq, out=lp).sum(dim=1)
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        lq.sub_(kl_qm.unsqueeze(1)).mul_(q)
        out.addcmul_(lq, coef * (1.0 - beta))
    elif name == "skew_forward_kl":  # m = αp + (1−α)q
        torch.sub(lq, lp, out=lp)  # r = lq − lp
        lq.copy_(lp)
        _log1p_exp_mix_(lq, alpha)  # u = log(α + (1−α) e^r) = lm − lp
        lp.sub_(lq).exp_().mul_(p)  # w = p·q/m = p·e^(r − u)
        loss = -lq.mul_(p).sum(dim=1)  # Σ p (lp − lm)
        q.mul_(lp.sum(dim=1, keepdim=True)).sub_(lp)  # q·Σw − w
        out.addcmul_(q, coef * (1.0 - alpha))
    elif name == "skew_reverse_kl":  # m = αq + (1−α)p
        torch.sub(lp, lq, out=lp)  # −r = lp − lq
        lq.copy_(lp)
        _log1p_exp_mix_(lq, alpha)  # log(α + (1−α) e^−r) = lm − lq
        lq.neg_()  # d = lq − lm
        loss = torch.mul(q, lq, out=lp).sum(dim=1)
        torch.exp(lq, out=p).mul_(alpha)  # α q/m
        lq.sub_(p)  # a = d − α q/m
        sqa = torch.mul(q, lq, out=p).sum(dim=1, keepdim=True)
        lq.sub_(sqa + q.sum(dim=1, keepdim=True) - 1.0).mul_(q)
        out.addcmul_(lq, coef)
    elif name == "tvd":
        torch.sub(q, p, out=lp)
        torch.sign(lp, out=p)
        loss = 0.5 * lp.abs_().sum(dim=1)  # ½ Σ |q − p|
        p.mul_(q)  # q·sign(q − p) = 2G
        p.addcmul_(q, -p.sum(dim=1, keepdim=True))
        out.addcmul_(p, coef * 0.5)
    else:
        raise ValueError(f"unknown divergence '{name}'")
    return loss


def sparse_kd_(name: str, lq: torch.Tensor, q: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor,
               t_tail: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
               beta: float, alpha: float) -> torch.Tensor:
    """Bucket divergence rows ``(c,)`` for sparse rows ``ids, t_lp (c, K)``, ``t_tail (c,)``;
    adds ``coef·∂L/∂s`` to ``out``. ``lq, q`` (student, ``(c, V)``) are left intact; ``scratch`` is clobbered."""
    k, vocab = ids.shape[1], lq.shape[1]
    l_student = lq.gather(1, ids)  # (c, K)
    tail = sparse.has_tail(k, vocab)
    if tail:
        scratch.copy_(lq).scatter_(1, ids, float("-inf"))  # the student's log-probs outside the kept ids
        m = scratch.amax(dim=1, keepdim=True)
        scratch.sub_(m).exp_()
        total = scratch.sum(dim=1, keepdim=True)
        scratch.div_(total)  # r_j = q_j / Q_tail outside ids, 0 at ids
        l_student = torch.cat([l_student, m + total.log()], dim=1)  # (c, K+1)
    l_teacher = sparse.teacher_buckets(t_lp, t_tail, vocab, lq.dtype)
    with torch.enable_grad():
        l_student = l_student.detach().requires_grad_(True)
        loss = divergences.apply(name, l_teacher, l_student, beta=beta, alpha=alpha)  # (c,)
        (g,) = torch.autograd.grad(loss.sum(), l_student)  # (c, K[+1]) = ∂L/∂lQ
    if tail:
        out.addcmul_(scratch, g[:, k:] * coef)
    out.addcmul_(q, -g.sum(dim=1, keepdim=True) * coef)
    out.scatter_add_(1, ids, g[:, :k] * coef)
    return loss.detach()


def sampled_forward_kl_(lq: torch.Tensor, q: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor,
                        t_tail: torch.Tensor, s_ids: torch.Tensor, s_lp: torch.Tensor, out: torch.Tensor,
                        coef: torch.Tensor) -> torch.Tensor:
    """Forward KL rows ``(c,)`` from top-k ``ids, t_lp (c, K)``, ``t_tail (c,)`` and a sampled tail
    ``s_ids, s_lp (c, M)`` (:func:`.sparse.sampled_forward_kl`); adds ``coef·∂L/∂s`` to ``out``.
    ``lq, q`` (student, ``(c, V)``) are left intact."""
    k, vocab = ids.shape[1], lq.shape[1]
    lq_top, lq_s = lq.gather(1, ids), lq.gather(1, s_ids)  # (c, K), (c, M)
    loss = sparse.sampled_forward_kl(t_lp, lq_top, t_tail, s_lp, lq_s, vocab)
    g_top = -t_lp.to(lq.dtype).exp()  # (c, K) = ∂L/∂lq at the top-k ids
    total = g_top.sum(dim=1, keepdim=True)  # (c, 1) = Σ G
    if sparse.has_tail(k, vocab) and s_ids.shape[1]:
        m = s_ids.shape[1]
        w = t_tail.to(lq.dtype).clamp(min=sparse.TAIL_FLOOR).exp().unsqueeze(1) / m  # (c, 1): one draw's weight
        out.scatter_add_(1, s_ids, (-w * coef).expand(-1, m).contiguous())  # repeated draws add up
        total = total - w * m  # Σ G = −(Σ_k p_k + p_tail)
    out.addcmul_(q, -total * coef)
    out.scatter_add_(1, ids, g_top * coef)
    return loss

"""The training objective with the student's LM head fused in, in bounded memory.

    loss = Σ_{t: labels_t ≠ −100} [ kd_weight · s_τ · KD_t + ce_weight · CE_t ] / n_tokens

``KD_t`` is the chosen divergence between teacher and student at ``loss_temperature`` τ (see
:mod:`.divergences`, :mod:`.sparse`), ``CE_t`` the student's cross-entropy on the label (τ = 1),
``s_τ = τ²`` when ``kd_t2_scale`` (default, Hinton et al.: softening by τ shrinks the KD gradient
by ~1/τ², so τ² keeps its magnitude comparable across temperatures and to the CE term) else 1, and
``n_tokens`` the target count of the whole accumulation window (see :func:`.per_token.reduce`).

How (Liger-style, for CPU): the target rows of the flattened ``(B·T, H)`` hidden states are gathered
first (masked positions cost nothing), then handled ``chunk_size`` rows at a time. For each chunk
the forward pass computes the student logits ``(c, V)`` into a reusable buffer, the teacher's rows
into another (``logits[rows]``, or the lazy teacher's LM head applied to those rows only, or the
sparse rows, with the sampled tail for forward KL), the loss, and — with the hand-written gradients of :mod:`.kernels` — ``∂loss/∂z``,
from which ``∂/∂hidden_rows = dz·W`` and ``∂/∂W += dzᵀ·h`` follow by two matmuls. Backward only
scales the stored gradients by the incoming scalar. Peak extra memory is five ``(chunk_size, V)``
buffers plus one ``(V, H)`` gradient, against several ``(B·T, V)`` tensors for the plain path.

Under bf16 autocast (the train loop's mixed precision) the three head matmuls (``z = h·Wᵀ``, ``dh = dz·W``,
``dW = dzᵀ·h``) take bf16 operands with fp32 accumulation, as autocast would give the student's own ``lm_head``;
the softmax, the loss and ``dz`` stay fp32 and the products are summed in fp32. They run ``HEAD_BLOCK``
vocabulary rows at a time, so the bf16 scratch is ``(c, HEAD_BLOCK)``, not another ``(c, V)`` or ``(V, H)``.
Why: at a 50k vocabulary these ``2·n·H·V``-FLOP matmuls are the largest compute of the step, and a CPU with
AVX512-BF16 / AMX (or a GPU) runs them several times faster in bf16 (same scheme and measured tolerance as
:mod:`distillery.xtok.fused`). Without autocast, and in float64, the path is fp32 (fp64) as before.

:func:`distill_loss_full` is the plain path (materialised logits, autograd): the parity reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..targets import TeacherTargets
from . import divergences, kernels, sparse
from .inputs import LossInputError, as_targets, check_sparse_ids, combined_mask, temperature, vocab_width
from .per_token import cross_entropy, divergence, reduce


@dataclass
class _Plan:
    """Everything the fused forward needs besides the differentiable tensors."""

    kd: str
    beta: float
    alpha: float
    tau: float
    kd_coef: float  # kd_weight · s_τ / n_tokens
    ce_coef: float  # ce_weight / n_tokens
    teacher: TeacherTargets | None
    rows: torch.Tensor  # (n,) flattened positions of the target rows
    labels: torch.Tensor  # (n,) their labels
    kd_on: torch.Tensor | None  # (n,) bool: the teacher has a target there (TeacherTargets.mask)
    vocab: int
    chunk_size: int
    stats: dict = field(default_factory=dict)
    head_dtype: torch.dtype | None = None  # the head matmuls' operand dtype (bf16 under autocast), None = fp32/fp64


def autocast_head_dtype(device: torch.device | str) -> torch.dtype | None:
    """``torch.bfloat16`` when bf16 autocast is on for ``device`` right now (the fused heads here and in
    :mod:`distillery.xtok.fused` then run their matmuls in bf16), else None. fp16 autocast is left in fp32: ``dz``
    is formed before the loss scaler multiplies it, and small gradients would flush to zero in fp16's range."""
    kind = torch.device(device).type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
        return torch.bfloat16
    return None


HEAD_BLOCK = 8192  # vocabulary rows per bf16 head matmul: bf16 / fp32 scratch of (c, 8192) / (8192, H), not (c, V)


def low_head_scratch(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The flat scratch of :func:`head_logits_` / :func:`head_grads_` for chunks of up to ``rows`` rows."""
    return torch.empty(rows * HEAD_BLOCK, dtype=dtype, device=device)


def head_logits_(hm: torch.Tensor, w: torch.Tensor, z: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """``z (k, V) = hm (k, H) · w (V, H)ᵀ``. ``scratch`` None: one matmul in ``z``'s dtype (fp32/fp64). Else bf16
    operands, ``HEAD_BLOCK`` vocabulary columns per matmul: each block's product (fp32 accumulation) is rounded to
    bf16 once and widened into ``z``; ``scratch``: a flat bf16 buffer of at least ``k · HEAD_BLOCK`` elements."""
    if scratch is None:
        torch.mm(hm, w.t(), out=z)
        return
    k = hm.shape[0]
    for a in range(0, w.shape[0], HEAD_BLOCK):
        b = min(a + HEAD_BLOCK, w.shape[0])
        out = scratch[:k * (b - a)].view(k, b - a)
        torch.mm(hm, w[a:b].t(), out=out)
        z[:, a:b].copy_(out)


def head_grads_(dz: torch.Tensor, w: torch.Tensor, hm: torch.Tensor, grad_h: torch.Tensor | None,
                grad_w: torch.Tensor | None, scratch: torch.Tensor | None, w_rows: torch.Tensor | None = None) -> None:
    """``grad_h (k, H) = dz (k, V) · w`` and ``grad_w (V, H) += dzᵀ · hm`` (skipped where None). ``scratch`` None:
    one matmul each in ``dz``'s dtype. Else bf16 operands, ``HEAD_BLOCK`` vocabulary rows at a time: the block of
    ``dz`` is rounded to bf16 once, each block's products are added in fp32 (no ``(V, H)`` or ``(k, V)``
    temporary); ``scratch`` as in :func:`head_logits_`. ``w_rows (V,)`` (blocked path only): row ``i`` of ``w``
    is row ``w_rows[i]`` of ``grad_w`` (a reordered head's gradient lands in the original order)."""
    if w_rows is not None and scratch is None:
        raise ValueError("head_grads_: w_rows needs the blocked (bf16) path")
    if scratch is None:
        if grad_h is not None:
            torch.mm(dz, w, out=grad_h)
        if grad_w is not None:
            grad_w.addmm_(dz.t(), hm)
        return
    k = dz.shape[0]
    if grad_h is not None:
        grad_h.zero_()
    for a in range(0, w.shape[0], HEAD_BLOCK):
        b = min(a + HEAD_BLOCK, w.shape[0])
        d = scratch[:k * (b - a)].view(k, b - a).copy_(dz[:, a:b])  # (k, blk) bf16
        if grad_h is not None:
            grad_h.add_(torch.mm(d, w[a:b]))
        if grad_w is not None and w_rows is None:
            grad_w[a:b].add_(torch.mm(d.t(), hm))
        elif grad_w is not None:
            grad_w.index_add_(0, w_rows[a:b], torch.mm(d.t(), hm).to(grad_w.dtype))

def _teacher_rows_into(t: TeacherTargets, rows: torch.Tensor, vocab: int, out: torch.Tensor) -> None:
    """``out (c, V) = t.dense_logits(rows)[:, :V]``, written into ``out`` without a temporary when
    the dtypes allow (lazy form: the teacher's LM head applied to these rows only)."""
    if t.logits is not None:
        flat = t.logits.reshape(-1, t.logits.shape[-1])[:, :vocab]  # (B*T, V)
        if int(rows[-1] - rows[0]) == rows.numel() - 1:  # a contiguous run of positions: plain copy
            out.copy_(flat.narrow(0, int(rows[0]), rows.numel()))
        elif flat.dtype == out.dtype:
            torch.index_select(flat, 0, rows, out=out)
        else:
            out.copy_(flat.index_select(0, rows))
        return
    h = t.hidden.reshape(-1, t.hidden.shape[-1]).index_select(0, rows)  # (c, H_t)
    w = t.lm_head_weight[:vocab]  # (V, H_t)
    if h.dtype == out.dtype and w.dtype == out.dtype:
        torch.mm(h, w.t(), out=out)
    else:
        out.copy_(F.linear(h, w))
    if t.lm_head_bias is not None:
        out.add_(t.lm_head_bias[:vocab].to(out.dtype))


def _fused_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan,
                   need_w: bool, need_b: bool):
    """Loss and its gradients w.r.t. ``h (n, H)``, ``weight[:V]`` and ``bias[:V]``, chunk by chunk."""
    dtype = torch.float64 if torch.float64 in (h.dtype, weight.dtype) else torch.float32
    n, hid = h.shape
    v, c = plan.vocab, max(1, min(plan.chunk_size, h.shape[0]))
    low = plan.head_dtype if dtype == torch.float32 else None  # bf16 head matmuls (module doc); never for fp64
    hc, w = h.to(dtype), weight[:v].to(dtype if low is None else low)  # (n, H), (V, H)
    hm = hc if low is None else h.to(low)
    b = None if bias is None else bias[:v].to(dtype)
    grad_h = torch.empty(n, hid, dtype=dtype, device=h.device)
    grad_w = torch.zeros(v, hid, dtype=dtype, device=h.device) if need_w else None
    grad_b = torch.zeros(v, dtype=dtype, device=h.device) if need_b else None
    t = plan.teacher
    dense_teacher = t is not None and not t.is_sparse
    n_buffers = 3 + (2 if dense_teacher else 1 if t is not None else 0)
    buffers = [torch.empty(c, v, dtype=dtype, device=h.device) for _ in range(n_buffers if n else 0)]
    lbuf = None if low is None else low_head_scratch(c, low, h.device)  # bf16 scratch of the blocked head matmuls
    kd_sum = torch.zeros((), dtype=dtype, device=h.device)
    ce_sum = torch.zeros((), dtype=dtype, device=h.device)
    for start in range(0, n, c):
        end = min(start + c, n)
        z, q, out, *rest = (buf[:end - start] for buf in buffers)  # (k, V) views
        y = plan.labels[start:end]
        head_logits_(hm[start:end], w, z, lbuf)  # student logits (k, V); the softmax and the loss in fp32
        if b is not None:
            z.add_(b)
        if t is not None and plan.tau != 1.0:
            ce_rows = kernels.cross_entropy_(z, y, out, plan.ce_coef)  # at τ = 1, before z is softened
            z.div_(plan.tau)
            kernels.log_softmax_(z, q)
        else:
            kernels.log_softmax_(z, q)  # τ = 1: the KD and CE log-probs are the same
            ce_rows = kernels.cross_entropy_from_logprobs_(z, q, y, out, plan.ce_coef)
        ce_sum += ce_rows.sum()
        if t is not None:
            rows = plan.rows[start:end]
            coef = torch.full((end - start, 1), plan.kd_coef / plan.tau, dtype=dtype, device=h.device)
            if plan.kd_on is not None:
                coef.mul_(plan.kd_on[start:end].unsqueeze(1).to(dtype))
            if dense_teacher:
                tl, p = rest
                _teacher_rows_into(t, rows, v, tl)
                if plan.tau != 1.0:
                    tl.div_(plan.tau)
                kernels.log_softmax_(tl, p)
                kd_rows = kernels.dense_kd_(plan.kd, z, q, tl, p, out, coef, plan.beta, plan.alpha)
            else:
                ids, t_lp, t_tail = t.sparse_rows(rows)
                drawn = t.sample_rows(rows) if sparse.uses_samples(plan.kd, plan.beta, plan.alpha) else None
                if drawn is not None:  # forward KL: top-k exact + the sampled tail's estimate
                    kd_rows = kernels.sampled_forward_kl_(z, q, ids.long(), t_lp, t_tail, drawn[0].long(), drawn[1],
                                                          out, coef)
                else:
                    kd_rows = kernels.sparse_kd_(plan.kd, z, q, ids.long(), t_lp, t_tail, rest[0], out, coef,
                                                 plan.beta, plan.alpha)
            if plan.kd_on is not None:
                kd_rows = torch.where(plan.kd_on[start:end], kd_rows, torch.zeros_like(kd_rows))
            kd_sum += kd_rows.sum()
        head_grads_(out, w, hm[start:end], grad_h[start:end], grad_w, lbuf)  # ∂loss/∂h rows (k, H), ∂loss/∂W (V, H)
        if grad_b is not None:
            grad_b.add_(out.sum(dim=0))
    loss = plan.kd_coef * kd_sum + plan.ce_coef * ce_sum
    plan.stats.update(kd_sum=float(kd_sum), ce_sum=float(ce_sum), tokens=float(n))
    return loss, grad_h, grad_w, grad_b


class _FusedDistillLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, h, weight, bias, plan):
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):
            loss, gh, gw, gb = _fused_forward(h.detach(), weight.detach(), None if bias is None else bias.detach(),
                                              plan, need_w, need_b)
        ctx.grads = (gh, gw, gb)
        ctx.shapes = (h.dtype, weight.shape, weight.dtype, None if bias is None else (bias.shape, bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.grads
        h_dtype, w_shape, w_dtype, b_meta = ctx.shapes
        g = grad_out.to(gh.dtype)
        scale = (lambda x: x) if bool(g == 1) else (lambda x: x.mul_(g))  # in place: the stored grads are ours
        grad_h = scale(gh).to(h_dtype)
        grad_w = grad_b = None
        if gw is not None:
            grad_w = scale(gw).to(w_dtype)
            if gw.shape[0] != w_shape[0]:  # head rows beyond vocab_size (padding) get no gradient
                grad_w = torch.cat([grad_w, grad_w.new_zeros(w_shape[0] - gw.shape[0], w_shape[1])])
        if gb is not None:
            grad_b = scale(gb).to(b_meta[1])
            if gb.shape[0] != b_meta[0][0]:
                grad_b = torch.cat([grad_b, grad_b.new_zeros(b_meta[0][0] - gb.shape[0])])
        ctx.grads = None
        return grad_h, grad_w, grad_b, None


def _prepare(hidden, lm_head_weight, teacher, labels, kd, beta, alpha, loss_temperature, kd_weight, ce_weight,
             n_tokens, vocab_size):
    """Validate the arguments shared by the fused and the full path; returns (targets, V, τ, s_τ-free n)."""
    divergences.check_params(kd, beta, alpha)
    if kd_weight < 0 or ce_weight < 0:
        raise LossInputError(f"kd_weight and ce_weight must be >= 0 (got {kd_weight}, {ce_weight})")
    if kd_weight > 0 and teacher is None:
        raise LossInputError("kd_weight > 0 needs teacher targets (teacher=None)")
    if hidden.shape[:-1] != labels.shape:
        raise LossInputError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    if lm_head_weight.shape[1] != hidden.shape[-1]:
        raise LossInputError(f"lm_head_weight {tuple(lm_head_weight.shape)} does not match hidden size {hidden.shape[-1]}")
    n = float(n_tokens)
    if n < 0:
        raise LossInputError(f"n_tokens must be >= 0, got {n}")
    t = None if teacher is None else as_targets(teacher)
    if t is None:
        v = vocab_size if vocab_size is not None else lm_head_weight.shape[0]
        if not 0 < v <= lm_head_weight.shape[0]:
            raise LossInputError(f"vocab_size={v} exceeds the LM head's {lm_head_weight.shape[0]} rows")
        return t, v, (1.0 if loss_temperature is None else float(loss_temperature)), max(n, 1.0)
    if t.shape != tuple(labels.shape):
        raise LossInputError(f"teacher targets cover {t.shape} positions, labels {tuple(labels.shape)}")
    v = vocab_width(lm_head_weight.shape[0], t, vocab_size)
    tau = temperature(t, loss_temperature)
    if t.is_sparse:
        check_sparse_ids(t.topk_ids, v)
        if t.n_samples:
            check_sparse_ids(t.sample_ids, v, what="sampled-tail")
    return t, v, tau, max(n, 1.0)


def chunked_distill_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                         teacher: TeacherTargets | torch.Tensor | None, labels: torch.Tensor, *,
                         kd: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                         loss_temperature: float | None = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                         n_tokens: float, chunk_size: int = 1024, vocab_size: int | None = None,
                         lm_head_bias: torch.Tensor | None = None,
                         kd_t2_scale: bool = True) -> tuple[torch.Tensor, dict]:
    """Fused LM head + KD/CE loss over the target rows, ``chunk_size`` rows at a time (module docstring).

    Args:
        hidden: student final hidden states ``(B, T, H)``.
        lm_head_weight: the student's LM head ``(V_s, H)`` (``lm_head_bias (V_s,)`` or None); rows
            beyond ``vocab_size`` (embedding padding) are unused and get a zero gradient.
        teacher: raw logits ``(B, T, V_t)`` or ``TeacherTargets`` (dense, lazy dense, sparse), or None
            when ``kd_weight == 0``. It is a constant: no gradient flows into it. Where
            ``TeacherTargets.mask`` is False the KD term is 0 (CE still applies).
        labels: ``(B, T)`` already shifted; ``-100`` = no loss at that position.
        kd / beta / alpha: divergence name and its mixture weights (``jsd`` uses beta, skews alpha).
        loss_temperature: τ for the KD term (sparse targets: must equal the recorded τ; None = theirs).
        kd_weight, ce_weight: weights of the two terms (the KD term is computed whenever a teacher is
            given, so ``stats`` report it, even at ``kd_weight = 0``).
        n_tokens: target tokens in the whole accumulation window (all ranks); the divisor.
        chunk_size: target rows per chunk (memory ≈ 5·chunk_size·V floats).
        vocab_size: compare only the first ``vocab_size`` columns (padded vocabularies).
        kd_t2_scale: multiply the KD term by τ² (Hinton); False = the plain divergence.
    Returns:
        ``(loss, stats)``: a scalar with gradients to ``hidden``, ``lm_head_weight`` (and the bias),
        and floats ``kd_sum`` / ``ce_sum`` (unweighted, unscaled sums over this call's target rows),
        ``tokens`` (their number) and ``kd_scale`` (the s_τ applied).
    """
    t, v, tau, n = _prepare(hidden, lm_head_weight, teacher, labels, kd, beta, alpha, loss_temperature,
                            kd_weight, ce_weight, n_tokens, vocab_size)
    if chunk_size <= 0:
        raise LossInputError(f"chunk_size must be > 0, got {chunk_size}")
    flat_y = labels.reshape(-1)
    rows = (flat_y != -100).nonzero().squeeze(1)  # (n_sel,) target positions
    y = flat_y.index_select(0, rows)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= v):
        raise LossInputError(f"labels span [{int(y.min())}, {int(y.max())}], outside the vocabulary [0, {v})")
    mask = None if t is None else combined_mask(None, t)
    scale = tau ** 2 if kd_t2_scale else 1.0
    plan = _Plan(kd=kd, beta=beta, alpha=alpha, tau=tau, kd_coef=kd_weight * scale / n, ce_coef=ce_weight / n,
                 teacher=t, rows=rows, labels=y, kd_on=None if mask is None else mask.reshape(-1)[rows],
                 vocab=v, chunk_size=chunk_size, head_dtype=autocast_head_dtype(hidden.device))
    h_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (n_sel, H): skip masked positions
    loss = _FusedDistillLoss.apply(h_rows, lm_head_weight, lm_head_bias, plan)
    return loss, dict(plan.stats, kd_scale=scale)


def distill_loss_full(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                      teacher: TeacherTargets | torch.Tensor | None, labels: torch.Tensor, *,
                      kd: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                      loss_temperature: float | None = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                      n_tokens: float, chunk_size: int | None = None, vocab_size: int | None = None,
                      lm_head_bias: torch.Tensor | None = None, kd_t2_scale: bool = True) -> tuple[torch.Tensor, dict]:
    """The same objective as :func:`chunked_distill_loss` on materialised ``(B, T, V)`` logits with
    autograd: the parity reference (memory grows with B·T·V). ``chunk_size`` is accepted and ignored
    so the two are interchangeable."""
    t, v, tau, n = _prepare(hidden, lm_head_weight, teacher, labels, kd, beta, alpha, loss_temperature,
                            kd_weight, ce_weight, n_tokens, vocab_size)
    bias = None if lm_head_bias is None else lm_head_bias[:v]
    logits = F.linear(hidden, lm_head_weight[:v], bias)  # (B, T, V)
    mask = labels != -100
    scale = tau ** 2 if kd_t2_scale else 1.0
    loss = torch.zeros((), dtype=logits.dtype if logits.dtype == torch.float64 else torch.float32,
                       device=hidden.device)
    stats = {"kd_sum": 0.0, "ce_sum": 0.0, "tokens": float(mask.sum()), "kd_scale": scale}
    if t is not None:
        kd_tok = divergence(kd, logits, t, beta=beta, alpha=alpha, loss_temperature=tau, vocab_size=v, mask=mask)
        loss = loss + kd_weight * scale * reduce(kd_tok, mask, n)
        stats["kd_sum"] = float(kd_tok.detach().sum())
    with torch.set_grad_enabled(torch.is_grad_enabled() and ce_weight > 0):
        ce_tok = cross_entropy(logits, labels, vocab_size=v)
    if ce_weight > 0:
        loss = loss + ce_weight * reduce(ce_tok, mask, n)
    stats["ce_sum"] = float(ce_tok.detach().sum())
    return loss, stats

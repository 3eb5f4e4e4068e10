"""The fused path of :func:`~distillery.xtok.losses.xtok_loss`: the student's LM head, the distribution term at the
1↔1 rows and its gradient, ``chunk_size`` rows at a time, with no autograd graph over any ``(rows, V)`` tensor.

Why: the reference path (autograd on each chunk under activation checkpointing) runs every chunk twice, gathers
columns of ``(c, V)`` tensors through the vocabulary map (``index_select`` / boolean masks along the last axis) and
leaves a dozen ``(c, V)`` temporaries per chunk to the allocator; on the real pair (SmolLM2 → GPT-2 vocabulary, 4×128
tokens) the loss took ~6× the student's whole CE step. Here, as in :mod:`distillery.losses.chunked`:

* **Matched-first layout.** Both heads are reordered once per call so that column ``i < M`` of the student logits is
  student id ``S_i`` and column ``i`` of the teacher logits is its partner ``T_i``; the unmatched ids follow. The
  matched part and the rest are then plain slices ``[:, :M]`` / ``[:, M:]`` (no gathers); the gradient of the
  reordered student head is put back in vocabulary order once.
* **Gradients in the forward pass.** For ``s = z / τ``, ``lq = log_softmax(s)``, ``q = exp(lq)`` and a row loss
  ``L(lq)`` with ``G = ∂L/∂lq``: ``∂L/∂s = G − q·ΣG`` and ``∂L/∂z = ∂L/∂s / τ``; then ``∂/∂h = dz·W`` and
  ``∂/∂W += dzᵀ·h`` (two matmuls per chunk). For ``exact_kl`` ``G`` is written by hand (below); ``uld`` and ``gold``
  get ``G`` from autograd on the chunk's ``lq`` alone (sorts and masks are theirs, the head is still fused).
* **Head matmuls in the autocast dtype.** Under bf16 autocast (the train loop's mixed precision) the three head
  matmuls (``z = h·Wᵀ``, ``dh = dz·W``, ``dW = dzᵀ·h``) take bf16 operands with fp32 accumulation inside the matmul,
  as autocast would give the student's own ``lm_head``; everything between them (the log-softmax, the loss and
  ``dz``) stays fp32, and the products are summed in fp32, ``HEAD_BLOCK`` vocabulary rows at a time (bf16 scratch
  ``(c, HEAD_BLOCK)``; the reordered head is a bf16 copy, half the fp32 one). Why: these matmuls are
  ``2·n·H·V`` FLOPs each, the largest compute in the step at a 50k vocabulary, and a CPU with AVX512-BF16 / AMX
  (or a GPU) runs them several times faster in bf16. The price is bf16 rounding of the logits and of ``dz``
  (relative 2⁻⁸): the loss moves by ~1e-4 relative, exact_kl gradients by ~1e-2 (``tests/test_xtok_fused_bf16.py``).
  Without autocast, and in float64, the path is fp32 (fp64) as before, bit for bit.
* **CE folded in** (``FusedPlan.ce_cols``; :func:`~.losses.xtok_loss`'s ``ce_weight``): rows ``[0, n_kd)`` carry the
  term plus ``λ·CE_r``, later rows ``λ·CE_r`` alone, so the train loop multiplies the student head once per step.
  ``CE_r = lse(z) − z_y`` and its gradient ``λ(q − e_y)`` join the term's: for ``exact_kl`` ``λ`` is added to ``S``
  and to the rest coefficient below, for ``uld``/``gold`` to ``−ΣG``; ``−λ`` at the label column. At τ ≠ 1 CE stays
  at τ = 1 (the student's own likelihood): the term's rows take ``lse(z)`` and ``q = softmax(z)`` of the raw logits
  before ``z`` is divided by τ, the term runs with ``λ = 0``, and ``λ(q − e_y)`` joins its ``∂L/∂z`` (one more
  ``(c, V)`` buffer); the CE-only rows are never divided.
* **Row weights.** Forward computes the gradient of ``Σ_r value_r`` (what ``per_token.sum()`` asks for); backward
  scales it when the incoming gradient is the same for every row (always, in the train loop) and otherwise
  recomputes the chunks with the incoming row weights (exact, twice the work).

``exact_kl`` by hand, sparse teachers and the ``uld`` / ``gold`` rows: :mod:`.row_terms`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..losses.chunked import autocast_head_dtype, head_grads_, head_logits_, low_head_scratch
from .row_terms import autograd_term_, exact_kl_dense_, exact_kl_sparse_, lse


@dataclass
class FusedPlan:
    """What the fused rows need besides the differentiable ``h`` / ``weight`` / ``bias``.

    ``perm``: the student's matched-first column order ``(V_s,)`` (None: vocabulary order, sparse teachers);
    ``dense_rows(lo, hi)``: the teacher's logits of rows ``lo:hi`` in the matched-first order ``(k, V_t)``;
    ``sparse_rows(lo, hi)``: ``(ids (k, K) student ids or -1, lp (k, K), rest (k,))`` at the loss temperature.
    """

    method: str
    tau: float
    width: int
    m: int
    chunk_size: int
    perm: torch.Tensor | None = None
    dense_rows: Callable | None = None
    sparse_rows: Callable | None = None
    beta: float = 0.5
    gold_weights: tuple[float, float] | None = None
    head_dtype: torch.dtype | None = None  # the head matmuls' operand dtype (bf16 under autocast), None = fp32/fp64
    n_kd: int | None = None  # rows [0, n_kd) carry the distribution term, the rest CE only (None: every row)
    ce_cols: torch.Tensor | None = None  # (n,) each row's label as a column of this plan's order: CE folded in
    ce_lambda: float = 0.0  # the CE weight relative to the distribution term's
    label_out: bool = False  # with ce_cols: also return each row's log q(label) at τ, differentiable (span terms)
    ce_labels: torch.Tensor | None = None  # (n,) the labels as vocabulary ids (label_out's backward)
    stats: dict = field(default_factory=dict)  # run() leaves ``ce_sum`` (Σ CE over the rows, unweighted) here


def matched_first(matched: torch.Tensor, width: int) -> torch.Tensor:
    """``(width,)`` int64: the ids of ``matched`` (in its order), then every other id ascending."""
    rest = torch.ones(width, dtype=torch.bool, device=matched.device)
    rest[matched] = False
    return torch.cat([matched.long(), rest.nonzero().squeeze(-1)])


ROW_MULTIPLE = 8
"""bf16 head matmuls run on a chunk's rows rounded up to a multiple of this (zero rows, zero gradient). Why: a step's
row count, and so each segment's last chunk, differs at every step, and new matmul shapes leave memory in the process
for good (oneDNN keeps kernels per shape, the heap fragments). Measured (``benchmarks/xtok_memory.py shapes``): 80
calls of this loss at 400-500 rows grew the process by 210 MB between the 10th and the 80th call unrounded, by none
rounded to 8 (with :func:`.row_terms.lse`'s scratch; 118 MB before it) and by none at a fixed row count. Rounded to 8, each last chunk takes at most 8 shapes, at < 1 % more
rows."""


def run(plan: FusedPlan, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        row_weight: torch.Tensor | None, need: tuple[bool, bool, bool]):
    """Values ``(n,)`` of rows ``h (n, H)`` and the gradients of ``Σ_r w_r·value_r`` w.r.t. ``h``, ``weight``,
    ``bias`` (``None`` where not ``need``-ed; ``w = row_weight`` or 1). With ``plan.ce_cols`` every row's value also
    holds ``ce_lambda · CE_r`` (rows from ``plan.n_kd`` on hold only that; module doc, "CE folded in")."""
    dtype = torch.float64 if torch.float64 in (h.dtype, weight.dtype) else torch.float32
    n, v = h.shape[0], plan.width
    n_kd = n if plan.n_kd is None else plan.n_kd
    low = plan.head_dtype if dtype == torch.float32 else None  # bf16 head matmuls (module doc); never for fp64
    if low is None:
        w = weight[:v] if plan.perm is None else weight[:v].index_select(0, plan.perm)
        w, hc = w.to(dtype), h.to(dtype)
        hm = hc
    else:  # cast before reordering: one (V, H) bf16 copy, no fp32 one
        w = weight[:v].to(low)
        w = w if plan.perm is None else w.index_select(0, plan.perm)
        hc = h.to(dtype)  # (n, H) fp32
        hm = torch.zeros(n + ROW_MULTIPLE, h.shape[1], dtype=low, device=h.device)  # bf16, zero rows after n
        hm[:n] = h
    b = None if bias is None else (bias[:v] if plan.perm is None else bias[:v].index_select(0, plan.perm)).to(dtype)
    grads = any(need)
    pad = 0 if low is None else ROW_MULTIPLE  # bf16: head matmuls on row counts rounded up (ROW_MULTIPLE's why)
    grad_h = torch.empty(n + pad, hc.shape[1], dtype=dtype, device=h.device) if need[0] else None
    # bf16 blocks add their (HEAD_BLOCK, H) products straight into vocabulary order (index_add): one fp32 (V, H)
    # gradient instead of a reordered one plus its vocabulary-order copy
    direct = low is not None
    grad_w = torch.zeros(weight.shape if direct else w.shape, dtype=dtype, device=h.device) if need[1] else None
    grad_b = torch.zeros(v, dtype=dtype, device=h.device) if need[2] and b is not None else None
    c = max(1, min(plan.chunk_size, n))
    zbuf = torch.empty(c, v, dtype=dtype, device=h.device)
    lbuf = None if low is None else low_head_scratch(c, low, h.device)  # bf16 scratch (losses.chunked.head_logits_)
    work = torch.empty(c * (v + 1), dtype=dtype, device=h.device)  # lse's scratch (a teacher's wider rows: below)
    lam = plan.ce_lambda if plan.ce_cols is not None else 0.0
    values, ce_values, labels_lp = [], [], []
    tbuf = pbuf = scratch = qbuf = None
    bounds = [(lo, min(lo + c, n_kd)) for lo in range(0, n_kd, c)] + [(lo, min(lo + c, n)) for lo in range(n_kd, n, c)]
    for lo, hi in bounds:
        k = hi - lo
        kp = k if low is None else min(c, -(-k // ROW_MULTIPLE) * ROW_MULTIPLE)  # matmul rows
        z, gbuf = zbuf[:k, :v], zbuf  # gbuf: the buffer the gradient ends up in
        head_logits_(hm[lo:lo + kp], w, zbuf[:kp, :v], lbuf)  # student logits (k, V_s); softmax and loss in fp32
        if b is not None:
            z.add_(b)
        rw = None if row_weight is None else row_weight[lo:hi].to(dtype).unsqueeze(1)  # (k, 1)
        cols = None if plan.ce_cols is None else plan.ce_cols[lo:hi].unsqueeze(1)  # (k, 1)
        z_label = None if cols is None else z.gather(1, cols).squeeze(1)  # before z is overwritten
        big = ce = q1 = lab = None
        hot = plan.tau != 1.0 and lo < n_kd  # the term's rows at τ ≠ 1: CE (at τ = 1) apart from the term
        if hot and cols is not None:  # CE_r = lse(z) − z_y on the raw logits; its q kept for the gradient
            big1 = lse(z, work)
            ce = big1.squeeze(1) - z_label
            if grads:
                if qbuf is None:
                    qbuf = torch.empty(c, v, dtype=dtype, device=h.device)
                q1 = torch.sub(z, big1, out=qbuf[:k, :v]).exp_()
        if hot:
            z.div_(plan.tau)
        if plan.label_out and plan.tau != 1.0:  # log q(label) at τ (at τ = 1 it is −CE_r, below)
            if qbuf is None:
                qbuf = torch.empty(c, v, dtype=dtype, device=h.device)
            s_ = z if hot else torch.div(z, plan.tau, out=qbuf[:k, :v])  # the CE-only rows are not divided
            lab = z_label / plan.tau - lse(s_, work).squeeze(1)
        lam_t = 0.0 if hot else lam  # the CE share the term's own gradient takes (τ = 1 only)
        if lo >= n_kd:  # CE only: value lam·(lse − z_y), gradient lam·(q − e_y)
            big = lse(z, work)
            val = torch.zeros(hi - lo, dtype=dtype, device=h.device)
            z.sub_(big).exp_().mul_(lam)
        elif plan.sparse_rows is not None:
            ids, lp, rest = plan.sparse_rows(lo, hi)
            if scratch is None:
                scratch = torch.empty(c, v + 1, dtype=dtype, device=h.device)
            val, big = exact_kl_sparse_(z, ids, lp, rest, scratch[:hi - lo], lam_t, work)
            z, gbuf = scratch[:k, :v], scratch  # the gradient
        else:
            t_logits = plan.dense_rows(lo, hi)
            if tbuf is None:
                tbuf = torch.empty(c, t_logits.shape[1], dtype=dtype, device=h.device)
                work = torch.empty(c * max(v + 1, t_logits.shape[1]), dtype=dtype, device=h.device)
            t = tbuf[:hi - lo]
            t.copy_(t_logits)
            if plan.tau != 1.0:
                t.div_(plan.tau)
            if plan.method == "exact_kl":
                if pbuf is None:
                    pbuf = torch.empty(c, plan.m, dtype=dtype, device=h.device)
                val, big = exact_kl_dense_(z, t, plan.m, pbuf[:hi - lo], lam_t, work)
            else:
                val, ce_t = autograd_term_(plan.method, z, t, plan.m, plan.beta, plan.gold_weights, rw, lam_t if rw is None else lam_t * rw,
                                            None if hot else cols)
                ce = ce if hot else ce_t
        weighted_later = plan.method == "exact_kl" or lo >= n_kd  # rows whose gradient is row-weighted below
        if hot and grads:
            z.div_(plan.tau)  # the term's ∂L/∂z = ∂L/∂s / τ, before CE's own gradient joins it
            if q1 is not None:
                z.add_(q1.mul_(lam if rw is None or weighted_later else rw * lam))  # CE's λ·q (at τ = 1)
        if cols is not None:
            ce = big.squeeze(1) - z_label if ce is None else ce
            ce_values.append(ce)
            if plan.label_out:
                labels_lp.append(-ce if lab is None else lab)
            val = val + lam * ce
            minus = torch.full_like(z_label.unsqueeze(1), -lam)  # the CE gradient's −e_y
            z.scatter_add_(1, cols, minus if rw is None or weighted_later else minus * rw)
        values.append(val)
        if not grads:
            continue
        if rw is not None and weighted_later:
            z.mul_(rw)
        dz = gbuf[:kp, :v]  # z over the matmul rows
        dz[k:].zero_()  # the padding rows add nothing to the head's gradient
        head_grads_(dz, w, hm[lo:lo + kp], None if grad_h is None else grad_h[lo:lo + kp], grad_w, lbuf,
                    plan.perm if direct else None)
        if grad_b is not None:
            grad_b.add_(z.sum(0))
    value = torch.cat(values) if values else torch.zeros(0, dtype=dtype, device=h.device)
    if plan.ce_cols is not None:
        plan.stats["ce_sum"] = float(torch.cat(ce_values).sum()) if ce_values else 0.0
    gw = grad_w if direct else _unpermute(grad_w, weight.shape, plan.perm)
    grad_h = None if grad_h is None else grad_h[:n]
    label_lp = torch.cat(labels_lp) if labels_lp else None
    return value, (grad_h, gw, _unpermute(grad_b, None if bias is None else bias.shape, plan.perm)), label_lp


def label_grads_(plan: FusedPlan, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 g: torch.Tensor, grads: tuple) -> None:
    """Add the gradient of ``Σ_r g_r · log q_r(label)`` (at τ; ``FusedPlan.label_out``) into ``grads`` (h, weight,
    bias; vocabulary order), recomputing the logits of the rows where ``g ≠ 0`` only, ``chunk_size`` at a time:
    ``∂/∂z = g_r (e_y − q) / τ``. In vocabulary order (only the label column is needed: no matched-first layout),
    the head in the plan's head dtype as in :func:`run`. Why here and not autograd over a checkpointed chunk: that
    made a fresh ``(V, H)`` weight gradient (and its bf16 twin) per chunk beside the one :func:`run` already holds,
    the largest memory of the cross-tokenizer step (``benchmarks/xtok_memory.py run``)."""
    rows = g.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    dtype = torch.float64 if torch.float64 in (h.dtype, weight.dtype) else torch.float32  # as run's
    v, c = plan.width, max(1, min(plan.chunk_size, rows.numel()))
    low = plan.head_dtype if dtype == torch.float32 else None
    w = weight[:v].to(low if low is not None else dtype)
    b = None if bias is None else bias[:v].to(dtype)
    lbuf = None if low is None else low_head_scratch(c + ROW_MULTIPLE, low, h.device)
    zbuf = torch.empty(c + ROW_MULTIPLE, v, dtype=dtype, device=h.device)
    gh = None if grads[0] is None else torch.empty(c + ROW_MULTIPLE, h.shape[1], dtype=dtype, device=h.device)
    hm = torch.zeros(c + ROW_MULTIPLE, h.shape[1], dtype=w.dtype, device=h.device)
    grad_w = None if grads[1] is None else grads[1][:v]
    for lo in range(0, rows.numel(), c):
        r = rows[lo:lo + c]
        k = r.numel()
        kp = k if low is None else -(-k // ROW_MULTIPLE) * ROW_MULTIPLE  # matmul rows, as run's
        hm[:kp].zero_()
        hm[:k] = h.index_select(0, r)
        z = zbuf[:k]
        head_logits_(hm[:kp], w, zbuf[:kp], lbuf)
        if b is not None:
            z.add_(b)
        if plan.tau != 1.0:
            z.div_(plan.tau)
        gr = (g.index_select(0, r).to(dtype) / plan.tau).unsqueeze(1)  # (k, 1)
        z.sub_(z.amax(1, keepdim=True)).exp_()  # softmax in place: no (k, V) temporary (ROW_MULTIPLE's why)
        z.mul_(z.sum(1, keepdim=True).reciprocal_().mul_(-gr))  # −g q / τ
        z.scatter_add_(1, plan.ce_labels.index_select(0, r).unsqueeze(1), gr)  # + g e_y / τ
        zbuf[k:kp].zero_()
        head_grads_(zbuf[:kp], w, hm[:kp], None if gh is None else gh[:kp], grad_w, lbuf)
        if gh is not None:
            grads[0].index_add_(0, r, gh[:k])
        if grads[2] is not None:
            grads[2][:v].add_(z.sum(0))


def _unpermute(grad: torch.Tensor | None, shape, perm: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of the first ``V`` (reordered) rows back in vocabulary order, zero rows beyond ``V``."""
    if grad is None:
        return None
    if perm is None and tuple(grad.shape) == tuple(shape):
        return grad
    full = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    if perm is None:
        full[:grad.shape[0]] = grad
        return full
    return full.index_copy_(0, perm, grad)


class FusedRows(torch.autograd.Function):
    """``apply(h (n, H), weight (V+, H), bias, plan) -> values (n,)``; gradients computed in forward (module doc)."""

    @staticmethod
    def forward(ctx, h, weight, bias, plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with torch.autocast(h.device.type, enabled=False):
            value, grads, label_lp = run(plan, h.detach(), weight.detach(), None if bias is None else bias.detach(),
                                         None, need)
        ctx.plan, ctx.need, ctx.grads = plan, need, grads
        ctx.inputs = (h.detach(), weight.detach(), None if bias is None else bias.detach())
        return value if label_lp is None else (value, label_lp)

    @staticmethod
    def backward(ctx, g, g_label=None):
        h, weight, bias = ctx.inputs
        if g.numel() and bool((g == g[0]).all()):  # the usual case: per_token.sum() -> the same weight everywhere
            scale = g[0]
            grads = ctx.grads
        else:  # other row weights: recompute the chunks with them
            scale = None
            with torch.autocast(h.device.type, enabled=False):
                _, grads, _ = run(ctx.plan, h, weight, bias, g.detach(), ctx.need)
        ctx.grads = ctx.inputs = None
        grads = [grad if grad is None or scale is None else grad.mul_(scale.to(grad.dtype))  # in place: no 2nd (V, H)
                 for grad in grads]
        if g_label is not None:  # the label log-probs' own gradient (span terms), added in place
            with torch.autocast(h.device.type, enabled=False):
                label_grads_(ctx.plan, h, weight, bias, g_label.detach(), grads)
        out = [None if grad is None else grad.to(like.dtype) for grad, like in zip(grads, (h, weight, bias))]
        return out[0], out[1], out[2], None


def fused_rows(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: FusedPlan):
    """Row values ``(n,)`` with gradients to ``h``, ``weight`` and ``bias`` (no graph kept when none is needed);
    with ``plan.label_out``, ``(values, log q(label) (n,))``, both differentiable."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias)):
        return FusedRows.apply(h, weight, bias, plan)
    with torch.autocast(h.device.type, enabled=False):
        value, _, label_lp = run(plan, h.detach(), weight.detach(), None if bias is None else bias.detach(), None,
                                 (False, False, False))
        return value if label_lp is None else (value, label_lp)


def lazy_teacher_rows(teacher, rows: torch.Tensor, t_perm: torch.Tensor | None, width: int) -> Callable:
    """``(lo, hi) -> (k, V_t)`` teacher logits of flattened teacher positions ``rows[lo:hi]``, matched first (the
    columns of each chunk gathered through ``t_perm``, for the lazy form after its LM head ran on those rows)."""
    if teacher.logits is not None:
        flat = teacher.logits.reshape(-1, teacher.logits.shape[-1])

        def dense(lo, hi):
            x = flat.index_select(0, rows[lo:hi])[:, :width]
            return x if t_perm is None else x.index_select(1, t_perm)
        return dense
    hid = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
    w = teacher.lm_head_weight[:width]
    b = None if teacher.lm_head_bias is None else teacher.lm_head_bias[:width]

    def lazy(lo, hi):  # the chunk's columns reordered, not the head: no (V_t, H) copy per call
        r = rows[lo:hi]
        extra = -r.numel() % ROW_MULTIPLE  # the matmul's rows rounded up, as the student's (ROW_MULTIPLE)
        x = F.linear(hid.index_select(0, torch.cat([r, r[-1:].expand(extra)]) if extra else r), w, b)
        return (x if t_perm is None else x.index_select(1, t_perm))[:r.numel()]
    return lazy

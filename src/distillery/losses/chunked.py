"""Memory-bounded distillation loss with the student's LM head fused in.

    loss = Σ_{t ∈ targets} [ kd_weight · τ² · KD_t + ce_weight · CE_t ] / n_tokens

``hidden (B, T, H)`` are the student's final hidden states and ``W (V, H)`` its LM head. Only the
target rows (``labels != -100``) are gathered, then processed ``chunk_size`` rows at a time: the
chunk's student logits ``(n, V)``, the teacher's rows (``TeacherTargets.dense_logits(rows)`` — the
live teacher's LM head is applied to those rows only — or its sparse rows), the loss, and at once its
gradient with respect to the chunk's hidden rows and ``W`` (the forward pass computes gradients, as
Liger's fused losses do). Peak extra memory is a few ``(chunk_size, V)`` tensors instead of several
``(B·T, V)`` ones; nothing is recomputed in backward, which only scales the stored gradients by the
incoming scalar.

Why hand-written: no library here offers a fused LM-head + KD loss that takes sparse top-k
teachers and a lazy teacher head on CPU (Liger's kernels are Triton, GPU only).
"""

from __future__ import annotations

import torch

from ..targets import TeacherTargets
from .divergences import KD_LOSSES, divergence_from_logprobs, teacher_student_logprobs


def _row_losses(logits: torch.Tensor, teacher, labels: torch.Tensor, rows, *, kd: str, beta: float, alpha: float,
                loss_temperature: float, vocab_size: int | None, want_kd: bool, want_ce: bool):
    """Per-row KD and CE ``(n,)`` for student logits ``(n, V)``; either may be None."""
    kd_rows = ce_rows = None
    if want_kd:
        lp, lq = teacher_student_logprobs(logits, teacher, loss_temperature, vocab_size, rows=rows)
        kd_rows = divergence_from_logprobs(kd, lp, lq, beta=beta, alpha=alpha)
    if want_ce:
        s = logits[:, :vocab_size] if vocab_size else logits
        ce_rows = torch.nn.functional.cross_entropy(s if s.dtype == torch.float64 else s.float(), labels,
                                                  reduction="none")
    return kd_rows, ce_rows


class _FusedLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, opts):
        B, T, H = hidden.shape
        flat_h = hidden.detach().reshape(B * T, H)  # (B*T, H)
        flat_y = labels.reshape(B * T)
        rows = (flat_y != -100).nonzero().squeeze(1)  # target positions only
        grad_h = torch.zeros_like(flat_h)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        w = weight.detach().requires_grad_(weight.requires_grad)
        b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        kd_sum = ce_sum = 0.0
        want_kd, want_ce = opts["kd_weight"] > 0 and teacher is not None, opts["ce_weight"] > 0
        kd_scale = opts["kd_weight"] * opts["loss_temperature"] ** 2 / opts["n_tokens"]
        ce_scale = opts["ce_weight"] / opts["n_tokens"]
        for start in range(0, rows.numel(), opts["chunk_size"]):
            r = rows[start:start + opts["chunk_size"]]
            with torch.enable_grad():
                h = flat_h[r].requires_grad_(True)  # (n, H)
                logits = torch.nn.functional.linear(h, w, b)  # (n, V)
                kd_rows, ce_rows = _row_losses(logits, teacher, flat_y[r], r, kd=opts["kd"], beta=opts["beta"],
                                               alpha=opts["alpha"], loss_temperature=opts["loss_temperature"],
                                               vocab_size=opts["vocab_size"], want_kd=want_kd, want_ce=want_ce)
                chunk = torch.zeros((), dtype=acc_dtype, device=hidden.device)
                if kd_rows is not None:
                    chunk = chunk + kd_scale * kd_rows.sum()
                    kd_sum += float(kd_rows.detach().sum())
                if ce_rows is not None:
                    chunk = chunk + ce_scale * ce_rows.sum()
                    ce_sum += float(ce_rows.detach().sum())
                inputs = [h] + [t for t in (w, b) if t is not None and t.requires_grad]
                if chunk.requires_grad:
                    grads = torch.autograd.grad(chunk, inputs)
                    grad_h[r] = grads[0].to(grad_h.dtype)
                    k = 1
                    if grad_w is not None:
                        grad_w += grads[k].to(grad_w.dtype)
                        k += 1
                    if grad_b is not None:
                        grad_b += grads[k].to(grad_b.dtype)
            total += chunk.detach()
        ctx.save_for_backward(grad_h.reshape(B, T, H), grad_w, grad_b)
        opts["stats"].update(kd_sum=kd_sum, ce_sum=ce_sum, tokens=int(rows.numel()))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None


def chunked_distill_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher: TeacherTargets | torch.Tensor | None,
                         labels: torch.Tensor, *, kd: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                         loss_temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                         n_tokens: float, chunk_size: int = 1024, vocab_size: int | None = None,
                         lm_head_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Fused LM head + KD/CE loss over target rows, in chunks (see module docstring).

    Args:
        hidden: student final hidden states ``(B, T, H)`` (requires grad).
        lm_head_weight: ``(V_s, H)``; ``lm_head_bias``: ``(V_s,)`` or None.
        teacher: ``TeacherTargets`` (dense, lazy dense or sparse), raw teacher logits ``(B, T, V_t)``,
            or None when ``kd_weight == 0``.
        labels: ``(B, T)`` already shifted, −100 = no target.
        n_tokens: target count of the whole accumulation window (all ranks), the divisor.
    Returns:
        ``(loss, stats)``: a scalar with gradients to ``hidden`` and the head, and detached sums
        ``kd_sum`` / ``ce_sum`` (unweighted, over this call's targets) and ``tokens``.
    """
    if kd not in KD_LOSSES:
        raise ValueError(f"unknown kd loss '{kd}' (choose one of {', '.join(KD_LOSSES)})")
    if kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs teacher targets")
    if isinstance(teacher, torch.Tensor):
        teacher = TeacherTargets(logits=teacher)
    stats: dict = {}
    opts = dict(kd=kd, beta=beta, alpha=alpha, loss_temperature=loss_temperature, kd_weight=kd_weight,
                ce_weight=ce_weight, n_tokens=max(float(n_tokens), 1.0), chunk_size=chunk_size,
                vocab_size=vocab_size, stats=stats)
    loss = _FusedLoss.apply(hidden, lm_head_weight, lm_head_bias, teacher, labels, opts)
    return loss, stats


def distill_loss_full(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher, labels: torch.Tensor, *,
                      kd: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1, loss_temperature: float = 1.0,
                      kd_weight: float = 1.0, ce_weight: float = 0.0, n_tokens: float, vocab_size: int | None = None,
                      lm_head_bias: torch.Tensor | None = None, **_ignored) -> tuple[torch.Tensor, dict]:
    """Reference path: materialise ``(B, T, V)`` logits and let autograd do the rest (parity tests only)."""
    from .divergences import divergence, cross_entropy, reduce

    logits = torch.nn.functional.linear(hidden, lm_head_weight, lm_head_bias)  # (B, T, V)
    mask = labels != -100
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    stats = {"kd_sum": 0.0, "ce_sum": 0.0, "tokens": int(mask.sum())}
    if kd_weight > 0 and teacher is not None:
        per = divergence(kd, logits, teacher, loss_temperature=loss_temperature, beta=beta, alpha=alpha,
                         vocab_size=vocab_size, mask=mask)
        loss = loss + kd_weight * loss_temperature ** 2 * reduce(per, mask, n_tokens)
        stats["kd_sum"] = float(per.detach().sum())
    if ce_weight > 0:
        per = cross_entropy(logits, labels, vocab_size=vocab_size)
        loss = loss + ce_weight * reduce(per, mask, n_tokens)
        stats["ce_sum"] = float(per.detach().sum())
    return loss, stats

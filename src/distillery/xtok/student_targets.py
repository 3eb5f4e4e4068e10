"""Teacher top-k targets moved onto the student's tokens: what a cached or served teacher hands a student with another
tokenizer (see docs/cross_tokenizer.md for how the cache stores the offsets this needs).

:func:`cached_to_student` is the pure function: teacher top-k per *teacher* position + both sides' byte offsets ->
:class:`StudentSideTargets` per *student* label position. At a 1↔1 position the teacher's top-k ids are mapped
through the vocabulary map (unmatched entries and the teacher's tail form the rest bucket, :func:`.losses.map_sparse_rows`);
at the last student position of a multi-token span it records the teacher's chain-rule span log-probability. The
loss on them, :func:`student_side_loss`, is the same number :func:`distillery.xtok.losses.xtok_loss` gives for the
same sparse teacher with ``method="exact_kl"`` (tested), so a run can map once (in a data worker) and train on the
result, or map per batch; nothing depends on where the teacher ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..losses.inputs import LossInputError
from ..targets import TeacherTargets
from . import terms
from .align import END, MERGED, NONE, ONE, Alignment, align_spans, block_alignment
from .fused import FusedPlan, fused_rows
from .losses import (StudentHead, _chunked, _dtype, _rebuild, _span_sums, _student_logits_rows, _student_tensors,
                     _teacher_label_table, map_sparse_rows, student_label_logprobs)
from .vocab_map import VocabMap


@dataclass
class StudentSideTargets:
    """Teacher signal on the student's label positions and vocabulary. Tensors ``(B, T_s, …)``.

    Fields:
        ids: ``(B, T_s, K)`` int64 student ids carrying teacher mass at ``ONE`` positions, ``-1`` = none.
        logprobs: ``(B, T_s, K)`` float32 the teacher's log-probs of those ids (at ``loss_temperature``).
        rest_logprob: ``(B, T_s)`` log of the teacher's mass on everything else (unmatched top-k + tail).
        span_logprob: ``(B, T_s)`` the teacher's chain-rule log-prob of the span at ``END``/``MERGED`` positions, 0 elsewhere.
        alignment: the :class:`~distillery.xtok.align.Alignment` these were made with.
        loss_temperature: the temperature of the teacher's log-probs.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest_logprob: torch.Tensor
    span_logprob: torch.Tensor
    alignment: Alignment
    loss_temperature: float


def student_side_targets(teacher: TeacherTargets, alignment: Alignment, vmap: VocabMap, *,
                         teacher_labels: torch.Tensor | None = None,
                         teacher_label_logprob: torch.Tensor | None = None) -> StudentSideTargets:
    """Sparse teacher targets ``(B, T_t)`` -> :class:`StudentSideTargets` ``(B, T_s)`` (module docstring).

    Span log-probs need ``teacher_label_logprob (B, T_t)`` or ``teacher_labels (B, T_t)`` (looked up in the top-k,
    else bounded, see :func:`~distillery.xtok.losses.teacher_label_logprobs`) when the alignment has multi-token spans.
    """
    if not teacher.is_sparse:
        raise LossInputError("student_side_targets maps sparse (top-k) teacher targets; reduce dense ones with "
                             "distillery.targets.sparse_from_logits first, or use xtok_loss directly")
    b, t_s = alignment.shape
    _, t_t = teacher.shape
    dev = teacher.topk_ids.device
    alignment = alignment.to(dev)
    kind = alignment.kind
    k = teacher.width
    batch_t = torch.arange(b, device=dev).unsqueeze(1) * t_t
    t_rows = (alignment.teacher_first.clamp(min=0) + batch_t).reshape(-1)
    ids, lp, rest = map_sparse_rows(*teacher.sparse_rows(t_rows), vmap)  # (B·T_s, K): every row, masked below
    one = (kind == ONE).reshape(-1)
    ids = torch.where(one.unsqueeze(-1), ids, torch.full_like(ids, -1))
    lp = torch.where(one.unsqueeze(-1), lp.float(), torch.zeros_like(lp, dtype=torch.float32))
    rest = torch.where(one, rest.float(), torch.zeros_like(rest, dtype=torch.float32))
    span = torch.zeros(b * t_s, device=dev)
    ends = ((kind == END) | (kind == MERGED)).reshape(-1).nonzero().squeeze(-1)
    if ends.numel():
        spans = (kind != NONE) & (kind != ONE)
        table = _teacher_label_table(teacher, alignment, teacher_labels, teacher_label_logprob, vmap,
                                     float(teacher.loss_temperature), 256, spans, batch_t)
        first = (alignment.teacher_first + batch_t).reshape(-1)[ends]
        last = (alignment.teacher_last + batch_t).reshape(-1)[ends]
        span[ends] = _span_sums(table, first, last)
    return StudentSideTargets(ids.reshape(b, t_s, k), lp.reshape(b, t_s, k), rest.reshape(b, t_s),
                              span.reshape(b, t_s), alignment, float(teacher.loss_temperature))


def cached_to_student(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
                      teacher_offsets: np.ndarray, student_offsets: np.ndarray, vmap: VocabMap, loss_temperature: float,
                      *, teacher_label_logprob: torch.Tensor | None = None, teacher_labels: torch.Tensor | None = None,
                      student_targets: np.ndarray | None = None,
                      teacher_targets: np.ndarray | None = None) -> StudentSideTargets:
    """One block: teacher top-k ``(T_t, K)``, ``(T_t, K)``, tail ``(T_t,)`` on teacher label positions, the byte
    offsets of the teacher's ``T_t + 1`` and the student's ``T_s + 1`` block tokens (``(·, 2)``, same coordinates,
    ``-1`` = special), optionally the teacher's own next tokens ``(T_t,)`` or their log-probs, and per label position
    target masks -> :class:`StudentSideTargets` ``(1, T_s)``.
    """
    t_t, t_s = topk_ids.shape[0], student_offsets.shape[0] - 1
    if teacher_offsets.shape[0] != t_t + 1:
        raise LossInputError(f"teacher offsets cover {teacher_offsets.shape[0]} tokens; {t_t} label positions need "
                             f"{t_t + 1}")
    alignment = block_alignment(align_spans(teacher_offsets, student_offsets), t_s, t_t, student_targets,
                                teacher_targets)
    teacher = TeacherTargets(topk_ids=topk_ids[None], topk_logprobs=topk_logprobs[None], tail_logprob=tail_logprob[None],
                             loss_temperature=loss_temperature)
    return student_side_targets(teacher, alignment, vmap,
                                teacher_labels=None if teacher_labels is None else teacher_labels[None],
                                teacher_label_logprob=None if teacher_label_logprob is None else teacher_label_logprob[None])


def student_side_loss(student: torch.Tensor | StudentHead, targets: StudentSideTargets, *, student_labels: torch.Tensor,
                      vocab_size: int, span_weight: float = 1.0, chunk_size: int = 256,
                      checkpoint: bool = True, fused: bool = True) -> torch.Tensor:
    """Per-token loss ``(B, T_s)`` on :class:`StudentSideTargets`: exact-string KL with a tail bucket at ``ONE``
    positions, ``span_weight`` × the span Bernoulli KL at ``END``/``MERGED`` (as :func:`~.losses.xtok_loss`).
    A :class:`StudentHead` takes the fused path (:mod:`.fused`) unless ``fused=False``."""
    dev = student_labels.device
    kind = targets.alignment.kind.to(dev)
    b, t_s = kind.shape
    tau, dtype = targets.loss_temperature, _dtype(student)
    per_token = torch.zeros(b * t_s, dtype=dtype, device=student_labels.device)
    one = (kind == ONE).reshape(-1).nonzero().squeeze(-1)
    k = targets.ids.shape[-1]
    ids, lp = targets.ids.to(dev).reshape(-1, k), targets.logprobs.to(dev).reshape(-1, k)
    rest = targets.rest_logprob.to(dev).reshape(-1)
    if one.numel() and fused and isinstance(student, StudentHead):  # the LM head fused in (xtok.fused)
        def rows(lo, hi):
            r = one[lo:hi]
            return ids[r], lp[r], rest[r]

        h = student.hidden.reshape(-1, student.hidden.shape[-1]).index_select(0, one)
        plan = FusedPlan("exact_kl", tau, vocab_size, 0, chunk_size, sparse_rows=rows)
        per_token = per_token.index_put((one,), fused_rows(h, student.weight, student.bias, plan).to(dtype))
    elif one.numel():
        def dist(lo, hi, *tensors):
            r = one[lo:hi]
            z = _student_logits_rows(_rebuild(student, tensors), r, vocab_size).to(dtype)
            return terms.matched_kl(torch.log_softmax(z / tau, dim=-1), ids[r], lp[r], rest[r])

        per_token = per_token.index_put((one,), _chunked(dist, one.numel(), chunk_size, checkpoint,
                                                        *_student_tensors(student)).to(dtype))
    ends = ((kind == END) | (kind == MERGED)).reshape(-1).nonzero().squeeze(-1)
    if ends.numel() and span_weight:
        s_rows = ((kind != NONE) & (kind != ONE)).reshape(-1).nonzero().squeeze(-1)
        lq_lab = torch.zeros(b * t_s, dtype=dtype, device=dev).index_put(
            (s_rows,), student_label_logprobs(student, student_labels, s_rows, vocab_size, tau, chunk_size, checkpoint))
        first = (targets.alignment.student_first.to(dev) + torch.arange(b, device=dev).unsqueeze(1) * t_s).reshape(-1)[ends]
        student_span = _span_sums(lq_lab, first, ends)
        teacher_span = targets.span_logprob.to(dev).reshape(-1)[ends]
        per_token = per_token.index_put((ends,), span_weight * terms.span_binary_kl(teacher_span, student_span),
                                        accumulate=True)
    return per_token.reshape(b, t_s)

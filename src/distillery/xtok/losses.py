"""Cross-tokenizer KD as per-token losses ``(B, T_s)`` on the student's label positions.

Inputs: the student (logits ``(B, T_s, V_s)`` or a lazy :class:`StudentHead`), the teacher's targets in *its own*
tokenization and vocabulary (:class:`~distillery.targets.TeacherTargets` ``(B, T_t)``: dense, lazy hidden + LM head,
or sparse top-k + tail), the :class:`~distillery.xtok.align.Alignment` ``(B, T_s)`` and the
:class:`~distillery.xtok.vocab_map.VocabMap`. The loss at student position ``t`` is

* ``kind == ONE`` (1 student token ↔ 1 teacher token, both predicted from the same text prefix): the distribution
  term ``method`` between the student's row ``t`` and the teacher's row ``teacher_first[t]``
  (:mod:`.terms`: ``exact_kl`` — exact-string KL with a tail bucket, the default; ``uld``; ``gold``);
* ``kind in (END, MERGED)`` (the last student token of a span with several tokens on either side):
  ``span_weight ×`` :func:`~distillery.xtok.terms.span_binary_kl` of the span's teacher and student chain-rule
  log-probabilities (``Σ`` of the label log-probs over the span's positions on each side);
* everything else (``START``, ``INSIDE``, ``NONE``, masked): exactly 0 (a span's gradient reaches its ``START`` and
  ``INSIDE`` positions through the ``END`` term).

Values are divergences in nats without τ² (like :mod:`distillery.losses.per_token`); reduce with
:func:`distillery.losses.reduce`. **Default** ``method="exact_kl", span_weight=1``: with identical tokenizers every
position is ``ONE`` and the loss *is* ``forward_kl`` (tested to 1e-5); it is a proper divergence on the events both
vocabularies can name, it needs only top-k from a cache or a server (the sparse rows map exactly, no approximation
beyond the cache's own tail bucket), and multi-token spans get a calibrated sequence-level signal. ULD ignores token
identity and GOLD's adaptive weights give the matched part only ``M / V_t`` of the weight; to be measured.

**Fused path** (the default for a :class:`StudentHead`, :mod:`.fused`): at ``ONE`` rows the student's LM head, the
term and its gradient run chunk by chunk with both heads reordered matched-first and the gradient computed in the
forward pass (``exact_kl`` by hand; ``uld``/``gold`` by autograd on each chunk's log-probs only): one pass per chunk,
no checkpoint recompute, no column gathers. On the real pair (SmolLM2-135M → a GPT-2-vocabulary student, 4×128
tokens, 2 threads) the whole ``exact_kl`` train step went from 3.48 to 1.90 s and ``uld`` from 6.23 to 4.03 s, measured in
one run (benchmarks/results/cross_tokenizer.json, ``speed_fix``). Logits given as a
tensor, ``fused=False``, and a sparse teacher with ``uld``/``gold`` take the reference path below (the parity
reference of tests/test_xtok_fused.py).

**Memory.** Only aligned rows are touched, ``chunk_size`` at a time: the teacher's rows come from
``TeacherTargets.dense_logits(rows)`` (the lazy form runs its LM head on those rows only) or ``sparse_rows``; with
``checkpoint=True`` each chunk runs under ``torch.utils.checkpoint``, so autograd keeps no ``(rows, V)`` tensor for
backward (it recomputes the chunk: one extra teacher-head matmul per chunk). Peak extra memory is about
``chunk_size · (V_t + V_s)`` floats times a small constant, never ``B·T·V`` for either vocabulary.

**Sparse teachers.** ``exact_kl`` maps the top-k ids through the map and folds unmatched top-k entries into the
rest (:func:`map_sparse_rows`), so cached, served and live top-k targets give the same value for the same top-k.
``uld`` / ``gold`` need a full row: a sparse row is completed by spreading its tail mass evenly over the ids outside
its top-k (the maximum-entropy completion). Teacher span log-probs need the teacher's log-prob of its *own* next
token: pass ``teacher_label_logprob (B, T_t)`` (a live teacher gathers it; a cache can store it, see
docs/cross_tokenizer.md), else it is read from the dense row or found in the top-k; a label outside the top-k
gets ``min(tail, smallest top-k log-prob)``, an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..losses.chunked import autocast_head_dtype
from ..losses.inputs import LossInputError, temperature
from ..targets import TeacherTargets
from . import terms
from .align import END, MERGED, NONE, ONE, Alignment
from .fused import FusedPlan, fused_rows, lazy_teacher_rows, matched_first
from .vocab_map import VocabMap

METHODS = ("exact_kl", "uld", "gold")


@dataclass
class StudentHead:
    """The student's logits left unmaterialised: ``hidden (B, T, H)`` and the LM head ``weight (V_s, H)``, ``bias``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.hidden.shape[:2])  # type: ignore[return-value]


def _student_logits_rows(student: torch.Tensor | StudentHead, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Student logits of flattened positions ``rows``: ``(c, V_s)``."""
    if isinstance(student, StudentHead):
        h = student.hidden.reshape(-1, student.hidden.shape[-1]).index_select(0, rows)
        return F.linear(h, student.weight[:width], None if student.bias is None else student.bias[:width])
    return student.reshape(-1, student.shape[-1]).index_select(0, rows)[:, :width]


def _dtype(student: torch.Tensor | StudentHead) -> torch.dtype:
    t = student.hidden if isinstance(student, StudentHead) else student
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def map_sparse_rows(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, vmap: VocabMap):
    """Teacher top-k rows -> the student's vocabulary: ``(c, K), (c, K), (c,) -> ids (c, K), lp (c, K), rest (c,)``.

    ``ids[r, k]`` is the student id of teacher id ``topk[r, k]``, or ``-1``; the log-mass of unmatched entries joins
    the tail: ``rest = log(exp(tail) + Σ_{unmatched k} exp(lp_k))``. Matched ids stay distinct (the map is 1:1).
    """
    s_ids = vmap.t2s(ids.device)[ids.long()]
    unmatched = torch.where(s_ids < 0, lp, torch.full_like(lp, float("-inf"))).logsumexp(-1)
    return s_ids, lp, torch.logaddexp(tail.to(lp.dtype), unmatched)


def _complete_sparse(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, width: int) -> torch.Tensor:
    """Full teacher log-probs ``(c, V_t)`` from top-k rows: the tail spread evenly over the other ids."""
    k = ids.shape[-1]
    spread = tail.to(lp.dtype) - torch.log(torch.tensor(float(max(width - k, 1)), dtype=lp.dtype))
    full = spread.unsqueeze(-1).expand(-1, width).clone()
    return full.scatter_(-1, ids.long(), lp)


def _teacher_logprob_rows(teacher: TeacherTargets, rows: torch.Tensor, width: int, tau: float,
                          dtype: torch.dtype) -> torch.Tensor:
    """Full teacher log-probs ``(c, V_t)`` of flattened teacher positions ``rows`` at temperature ``tau``."""
    if teacher.is_sparse:
        ids, lp, tail = teacher.sparse_rows(rows)
        return _complete_sparse(ids, lp.to(dtype), tail, width)
    z = teacher.dense_logits(rows)[:, :width].to(dtype)
    return torch.log_softmax(z / tau, dim=-1)


def _distribution_rows(method: str, lq: torch.Tensor, teacher: TeacherTargets, t_rows: torch.Tensor, vmap: VocabMap,
                       tau: float, beta: float, weights) -> torch.Tensor:
    """The distribution term for ``c`` aligned rows: ``(c,)``."""
    if method == "exact_kl":
        if teacher.is_sparse:
            ids, lp, rest = map_sparse_rows(*teacher.sparse_rows(t_rows), vmap)
            return terms.matched_kl(lq, ids, lp, rest)
        lp = _teacher_logprob_rows(teacher, t_rows, vmap.teacher_vocab, tau, lq.dtype)
        t_ids, s_ids = vmap.teacher_ids.to(lp.device), vmap.student_ids.to(lp.device)
        rest_mask = torch.ones(lp.shape[-1], dtype=torch.bool, device=lp.device)
        rest_mask[t_ids] = False
        rest = lp[:, rest_mask].logsumexp(-1) if bool(rest_mask.any()) else lp.new_full((lp.shape[0],), float("-inf"))
        return terms.matched_kl(lq, s_ids, lp.index_select(-1, t_ids), rest)
    lp = _teacher_logprob_rows(teacher, t_rows, vmap.teacher_vocab, tau, lq.dtype)
    if method == "uld":
        return terms.uld(lp, lq)
    return terms.gold_hybrid(lp, lq, vmap.teacher_ids.to(lp.device), vmap.student_ids.to(lp.device), beta, weights)


def _chunked(fn, n: int, chunk_size: int, use_checkpoint: bool, *tensors: torch.Tensor) -> torch.Tensor:
    """``cat([fn(lo, hi, *tensors) for chunks])`` (``(n,)``), each chunk under activation checkpointing if asked."""
    out = []
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        if use_checkpoint and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            out.append(torch_checkpoint(fn, lo, hi, *tensors, use_reentrant=False))
        else:
            out.append(fn(lo, hi, *tensors))
    return torch.cat(out) if out else torch.zeros(0)


def _student_tensors(student) -> tuple[torch.Tensor, ...]:
    if isinstance(student, StudentHead):
        return (student.hidden, student.weight) + (() if student.bias is None else (student.bias,))
    return (student,)


def _rebuild(student, tensors):
    if isinstance(student, StudentHead):
        return StudentHead(*tensors) if len(tensors) == 3 else StudentHead(tensors[0], tensors[1])
    return tensors[0]


def student_label_logprobs(student: torch.Tensor | StudentHead, labels: torch.Tensor, rows: torch.Tensor,
                           width: int, tau: float, chunk_size: int = 256, checkpoint: bool = True) -> torch.Tensor:
    """``log softmax(z / τ)[label]`` at flattened student positions ``rows``: ``(n,)`` (differentiable)."""
    flat_labels = labels.reshape(-1)
    dtype = _dtype(student)

    def fn(lo, hi, *tensors):
        r = rows[lo:hi]
        z = _student_logits_rows(_rebuild(student, tensors), r, width).to(dtype) / tau
        return z.gather(-1, flat_labels[r].unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)

    return _chunked(fn, rows.numel(), chunk_size, checkpoint, *_student_tensors(student)).to(dtype)


def teacher_label_logprobs(teacher: TeacherTargets, labels: torch.Tensor, rows: torch.Tensor, width: int, tau: float,
                           chunk_size: int = 256) -> torch.Tensor:
    """The teacher's log-prob of its own next token at flattened positions ``rows``: ``(n,)`` (no gradient).

    Dense: read from the row. Sparse: found in the top-k, else ``min(tail, smallest top-k log-prob)`` (an upper bound).
    """
    flat = labels.reshape(-1)
    out = []
    with torch.no_grad():
        for lo in range(0, rows.numel(), chunk_size):
            r = rows[lo:lo + chunk_size]
            y = flat[r].long()
            if teacher.is_sparse:
                ids, lp, tail = teacher.sparse_rows(r)
                hit = ids.long() == y.unsqueeze(-1)
                found = torch.where(hit, lp, torch.full_like(lp, float("-inf"))).amax(-1)
                bound = torch.minimum(tail.to(lp.dtype), lp.amin(-1))
                out.append(torch.where(hit.any(-1), found, bound).float())
            else:
                lp = _teacher_logprob_rows(teacher, r, width, tau, torch.float32)
                out.append(lp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    return torch.cat(out) if out else torch.zeros(0)


def _span_sums(values: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``Σ values[b, first:last+1]`` per entry: ``values (B, T)``, ``first/last (n,)`` with batch ``bidx`` packed in.

    ``first`` and ``last`` are flattened indices into ``values`` within one batch row (``b·T + t``).
    """
    cs = F.pad(values.reshape(-1).cumsum(0), (1, 0))  # (B·T + 1,), cs[i] = Σ_{<i}
    return cs[last + 1] - cs[first]


def xtok_loss(student: torch.Tensor | StudentHead, teacher: TeacherTargets, alignment: Alignment, vmap: VocabMap, *,
              student_labels: torch.Tensor, teacher_labels: torch.Tensor | None = None,
              teacher_label_logprob: torch.Tensor | None = None, method: str = "exact_kl",
              span_weight: float = 1.0, beta: float = 0.5, gold_weights: tuple[float, float] | None = None,
              loss_temperature: float | None = None, chunk_size: int = 256, checkpoint: bool = True,
              fused: bool = True, ce_weight: float = 0.0, ce_stats: dict | None = None) -> torch.Tensor:
    """Per-token cross-tokenizer KD loss ``(B, T_s)`` (module docstring).

    Args:
        student: logits ``(B, T_s, V_s+)`` or :class:`StudentHead`; only the first ``vmap.student_vocab`` columns count.
        teacher: targets ``(B, T_t)`` in the teacher's vocabulary (first ``vmap.teacher_vocab`` columns).
        student_labels: ``(B, T_s)`` shifted labels (needed by span terms; ``-100`` positions are never aligned).
        teacher_labels: ``(B, T_t)`` the teacher's own next tokens, for span terms when ``teacher_label_logprob``
            ``(B, T_t)`` is not given.
        method: the distribution term at 1↔1 positions, one of ``METHODS``.
        beta / gold_weights: GOLD's JSD β (TRL default 0.5) and ``(w_matched, w_unmatched)`` (None = adaptive).
        fused: a :class:`StudentHead` takes the fused path at ``ONE`` rows (:mod:`.fused`; not for a sparse teacher
            with ``uld`` / ``gold``); False = the reference path (autograd per chunk, ``checkpoint``).
        ce_weight / ce_stats: CE folded into the fused pass (the train loop's; one pass over the student head
            instead of two): when ``ce_weight > 0``, ``ce_stats`` is a dict and the fused path runs, every
            label position ``t`` (``student_labels ≠ −100``) gains ``ce_weight · CE_t`` (``CE_t = −log q(label)``
            at τ = 1, whatever the loss temperature) and ``ce_stats`` gets ``ce_sum`` (``Σ CE_t``, a float) and ``rows`` (those positions, flattened).
            Otherwise ``ce_stats`` stays empty and the caller computes CE itself.
    """
    if method not in METHODS:
        raise LossInputError(f"unknown cross-tokenizer method '{method}' (choose one of {', '.join(METHODS)})")
    b, t_s = alignment.shape
    b_t, t_t = teacher.shape
    if tuple(student.shape[:2]) != (b, t_s) or tuple(student_labels.shape) != (b, t_s):
        raise LossInputError(f"student {tuple(student.shape[:2])} / labels {tuple(student_labels.shape)} do not match "
                             f"the alignment's {(b, t_s)}")
    if b_t != b or t_t < alignment.teacher_len:
        raise LossInputError(f"teacher targets cover {(b_t, t_t)} positions, the alignment needs {(b, alignment.teacher_len)}")
    tau = temperature(teacher, loss_temperature)
    dtype = _dtype(student)
    kind = alignment.kind.to(student_labels.device)
    per_token = torch.zeros(b * t_s, dtype=dtype, device=student_labels.device)
    batch_t = torch.arange(b, device=kind.device).unsqueeze(1) * t_t  # (B, 1): flat teacher row offset

    one = (kind == ONE).reshape(-1).nonzero().squeeze(-1)
    folded_label_lp = None  # with CE folded in: log q(label) at τ of every label row, in the order of ``rows``
    take_fused = fused and isinstance(student, StudentHead) and (not teacher.is_sparse or method == "exact_kl")
    fold_ce = take_fused and ce_weight > 0 and ce_stats is not None
    if fold_ce:  # the ONE rows first (distribution term + CE), then every other label position (CE only)
        flat_labels = student_labels.reshape(-1)
        is_label = flat_labels != -100
        is_label[one] = False
        rows = torch.cat([one, is_label.nonzero().squeeze(-1)])
        y = flat_labels.index_select(0, rows).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= vmap.student_vocab):
            raise LossInputError(f"student labels span [{int(y.min())}, {int(y.max())}], outside the student "
                                 f"vocabulary [0, {vmap.student_vocab})")
        t_rows = (alignment.teacher_first.to(kind.device) + batch_t).reshape(-1)[one]
        stats: dict = {}
        spans_too = bool(span_weight) and bool(((kind == END) | (kind == MERGED)).any())
        values = _fused_one(student, teacher, t_rows, rows, vmap, method, tau, beta, gold_weights, chunk_size,
                            ce=(y, float(ce_weight), one.numel(), stats), label_out=spans_too)
        if spans_too:  # every label's log q at τ from the same pass: the span term below reads it (no 2nd head pass)
            values, folded_label_lp = values
        per_token = per_token.index_put((rows,), values.to(dtype))
        ce_stats.update(ce_sum=stats["ce_sum"], rows=rows)
    elif one.numel() and take_fused:
        t_rows = (alignment.teacher_first.to(kind.device) + batch_t).reshape(-1)[one]
        per_token = per_token.index_put((one,), _fused_one(student, teacher, t_rows, one, vmap, method, tau, beta,
                                                           gold_weights, chunk_size).to(dtype))
    elif one.numel():
        t_rows = (alignment.teacher_first.to(kind.device) + batch_t).reshape(-1)[one]

        def dist(lo, hi, *tensors):
            z = _student_logits_rows(_rebuild(student, tensors), one[lo:hi], vmap.student_vocab).to(dtype)
            lq = torch.log_softmax(z / tau, dim=-1)
            return _distribution_rows(method, lq, teacher, t_rows[lo:hi], vmap, tau, beta, gold_weights)

        per_token = per_token.index_put((one,), _chunked(dist, one.numel(), chunk_size, checkpoint,
                                                        *_student_tensors(student)).to(dtype))

    ends = ((kind == END) | (kind == MERGED)).reshape(-1).nonzero().squeeze(-1)
    if ends.numel() and span_weight:
        spans = (kind != NONE) & (kind != ONE)
        s_rows = spans.reshape(-1).nonzero().squeeze(-1)
        lq_lab = torch.zeros(b * t_s, dtype=dtype, device=kind.device)
        at = None
        if folded_label_lp is not None:  # each span row's place among the folded rows (-1: not a label row)
            at = torch.full((b * t_s,), -1, dtype=torch.long, device=kind.device)
            at[rows] = torch.arange(rows.numel(), device=kind.device)
            at = at.index_select(0, s_rows)
        if at is not None and bool((at >= 0).all()):
            lq_lab = lq_lab.index_put((s_rows,), folded_label_lp.index_select(0, at).to(dtype))
        else:
            lq_lab = lq_lab.index_put((s_rows,), student_label_logprobs(student, student_labels, s_rows,
                                                                         vmap.student_vocab, tau, chunk_size,
                                                                         checkpoint))
        batch_s = torch.arange(b, device=kind.device).unsqueeze(1) * t_s
        s_first = (alignment.student_first.to(kind.device) + batch_s).reshape(-1)[ends]
        student_span = _span_sums(lq_lab.reshape(b, t_s), s_first, ends)
        t_first = (alignment.teacher_first.to(kind.device) + batch_t).reshape(-1)[ends]
        t_last = (alignment.teacher_last.to(kind.device) + batch_t).reshape(-1)[ends]
        lp_lab = _teacher_label_table(teacher, alignment, teacher_labels, teacher_label_logprob, vmap, tau,
                                      chunk_size, spans, batch_t)
        teacher_span = _span_sums(lp_lab, t_first, t_last)
        per_token = per_token.index_put((ends,), span_weight * terms.span_binary_kl(teacher_span, student_span),
                                        accumulate=True)
    return per_token.reshape(b, t_s)


def _fused_one(student: StudentHead, teacher: TeacherTargets, t_rows: torch.Tensor, one: torch.Tensor, vmap: VocabMap,
               method: str, tau: float, beta: float, gold_weights, chunk_size: int, ce=None,
               label_out: bool = False):
    """The distribution term at the ``ONE`` rows (flattened student positions ``one``, teacher rows ``t_rows``)
    through :func:`.fused.fused_rows`: ``(n,)``. ``ce = (labels (n,), weight, n_kd, stats)``: CE folded in, the
    first ``n_kd`` rows of ``one`` being the ``ONE`` rows and the rest CE-only rows; ``stats`` gets ``ce_sum``.
    ``label_out`` (with ``ce``): ``(values, log q(label) at τ (n,))``, both differentiable (the span term's)."""
    h = student.hidden.reshape(-1, student.hidden.shape[-1]).index_select(0, one)  # (n, H)
    dev = h.device
    low = autocast_head_dtype(dev)  # under bf16 autocast the head matmuls run in bf16 (fused module doc)
    if teacher.is_sparse:  # exact_kl only: the top-k mapped per chunk, vocabulary order
        def sparse(lo, hi):
            return map_sparse_rows(*teacher.sparse_rows(t_rows[lo:hi]), vmap)
        plan = FusedPlan(method, tau, vmap.student_vocab, vmap.n_matched, chunk_size, sparse_rows=sparse,
                         head_dtype=low)
    else:
        s_perm = matched_first(vmap.student_ids.to(dev), vmap.student_vocab)
        t_perm = matched_first(vmap.teacher_ids.to(dev), vmap.teacher_vocab)
        s_perm = None if torch.equal(s_perm, torch.arange(s_perm.numel(), device=dev)) else s_perm
        t_perm = None if torch.equal(t_perm, torch.arange(t_perm.numel(), device=dev)) else t_perm
        plan = FusedPlan(method, tau, vmap.student_vocab, vmap.n_matched, chunk_size, perm=s_perm,
                         dense_rows=lazy_teacher_rows(teacher, t_rows, t_perm, vmap.teacher_vocab), beta=beta,
                         gold_weights=gold_weights, head_dtype=low)
    if ce is not None:  # labels as columns of the plan's order: position of each id in the permutation
        labels, weight, plan.n_kd, stats = ce
        plan.ce_lambda, plan.stats = weight, stats
        plan.label_out, plan.ce_labels = label_out, labels
        if plan.perm is None:
            plan.ce_cols = labels
        else:
            inverse = torch.empty_like(plan.perm).scatter_(0, plan.perm, torch.arange(plan.perm.numel(), device=dev))
            plan.ce_cols = inverse.index_select(0, labels)
    return fused_rows(h, student.weight, student.bias, plan)


def _teacher_label_table(teacher, alignment, teacher_labels, teacher_label_logprob, vmap, tau, chunk_size, spans,
                         batch_t) -> torch.Tensor:
    """``(B, T_t)`` float: the teacher's label log-probs at every teacher position inside a multi-token span."""
    b, t_t = teacher.shape
    if teacher_label_logprob is not None:
        if tuple(teacher_label_logprob.shape) != (b, t_t):
            raise LossInputError(f"teacher_label_logprob {tuple(teacher_label_logprob.shape)} should be {(b, t_t)}")
        return teacher_label_logprob.float()
    if teacher_labels is None:
        raise LossInputError("span terms need the teacher's own next tokens: pass teacher_labels (B, T_t) or "
                             "teacher_label_logprob (B, T_t), or span_weight=0")
    covered = torch.zeros(b * t_t + 1, dtype=torch.int64, device=spans.device)
    first = (alignment.teacher_first.to(spans.device) + batch_t).reshape(-1)[spans.reshape(-1)]
    last = (alignment.teacher_last.to(spans.device) + batch_t).reshape(-1)[spans.reshape(-1)]
    covered.index_add_(0, first, torch.ones_like(first))
    covered.index_add_(0, last + 1, -torch.ones_like(last))
    rows = (covered.cumsum(0)[:-1] > 0).nonzero().squeeze(-1)  # every teacher row inside some span
    table = torch.zeros(b * t_t, dtype=torch.float32, device=spans.device)
    table[rows] = teacher_label_logprobs(teacher, teacher_labels, rows, vmap.teacher_vocab, tau, chunk_size)
    return table.reshape(b, t_t)

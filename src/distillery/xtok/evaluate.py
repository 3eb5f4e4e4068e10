"""Fidelity across tokenizers: metrics that mean the same whatever each side's vocabulary.

Per batch of the student's held-out blocks and the teacher's view of the same bytes (:mod:`.batch`):

* ``student_bits_per_byte`` = Σ_t −log₂ q_S(label_t) / Σ_t bytes(label_t) over the student's target positions;
  ``teacher_bits_per_byte`` the same over the teacher's label positions of the same text. Perplexities of two
  vocabularies are not comparable; bits per byte are (the lm-eval-harness convention);
* ``bits_per_char`` likewise per Unicode character of the aligned text (bytes of the labels decoded);
* ``kl_teacher_student`` = mean over 1↔1 aligned positions (one teacher token and one student token spelling the
  same bytes) of the exact-string KL with a tail bucket (:func:`~.terms.matched_kl`), nats;
* ``top1_agreement`` = share of those positions where the teacher's argmax token, mapped to the student's id with
  the same bytes, is the student's argmax (an argmax with no student counterpart counts as a disagreement);
* ``aligned_share`` = 1↔1 positions / student target positions;
* ``teacher_label_in_topk`` = share of the teacher's label positions whose label is in its top-k (1 for a dense
  teacher). Below 1 (a top-k cache or server), ``teacher_bits_per_byte`` is a **lower bound**: a label outside
  the top-k is scored ``min(tail, smallest top-k log-prob)``, an upper bound of its log-prob.
"""

from __future__ import annotations

import math

import torch

from .align import ONE


@torch.no_grad()
def evaluate_xtok(teacher, student, batches, xtok, *, teacher_vocab: int, student_vocab: int,
                  max_batches: int | None = None, chunk_rows: int = 256) -> dict:
    from ..evaluate import student_hidden
    from .losses import StudentHead, xtok_loss

    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    head = student.get_output_embeddings()
    s_spell = xtok._spelled
    t_spell = _spelling(xtok.teacher_tokenizer)
    sums = dict(s_bits=0.0, s_bytes=0, s_chars=0, t_bits=0.0, t_bytes=0, t_chars=0, kl=0.0, agree=0, one=0, tokens=0,
                t_known=0, t_tokens=0)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        view = xtok.view(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        tb = {k: v.to(device) for k, v in view.batch.items()}
        targets = teacher.targets(tb, vocab_size=teacher_vocab).to(device)
        h = student_hidden(student, batch)
        labels = batch["labels"]
        rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        hs = h.reshape(-1, h.shape[-1])
        for lo in range(0, rows.numel(), chunk_rows):
            r = rows[lo:lo + chunk_rows]
            lq = torch.log_softmax(torch.nn.functional.linear(hs[r], head.weight, head.bias).float()[:, :student_vocab], -1)
            y = labels.reshape(-1)[r]
            sums["s_bits"] += -lq.gather(1, y[:, None]).sum().item() / math.log(2)
            text = b"".join(s_spell[j] or b"" for j in y.tolist())
            sums["s_bytes"] += len(text)
            sums["s_chars"] += len(text.decode("utf-8", errors="replace"))
        sums["tokens"] += rows.numel()
        t_labels = tb["labels"]
        t_rows = (t_labels.reshape(-1) != -100).nonzero().squeeze(1)
        for lo in range(0, t_rows.numel(), chunk_rows):
            r = t_rows[lo:lo + chunk_rows]
            y = t_labels.reshape(-1)[r]
            lp, known = _teacher_logprobs(targets, r, y, teacher_vocab)
            sums["t_bits"] += -lp.sum().item() / math.log(2)
            sums["t_known"] += int(known.sum())
            sums["t_tokens"] += r.numel()
            text = b"".join(t_spell[j] or b"" for j in y.tolist())
            sums["t_bytes"] += len(text)
            sums["t_chars"] += len(text.decode("utf-8", errors="replace"))
        one = view.alignment.kind.to(device) == ONE
        if one.any():
            per = xtok_loss(StudentHead(h, head.weight, head.bias), targets, view.alignment.to(device), xtok.vmap,
                            student_labels=labels, method="exact_kl", span_weight=0.0, chunk_size=chunk_rows,
                            checkpoint=False)
            sums["kl"] += per[one].sum().item()
            sums["one"] += int(one.sum())
            s_rows = one.reshape(-1).nonzero().squeeze(1)
            t_rows1 = (view.alignment.teacher_first.to(device)
                       + torch.arange(one.shape[0], device=device)[:, None] * targets.shape[1]).reshape(-1)[s_rows]
            t_top = _teacher_argmax(targets, t_rows1, teacher_vocab)
            s_top = torch.nn.functional.linear(hs[s_rows], head.weight, head.bias)[:, :student_vocab].argmax(-1)
            sums["agree"] += int((xtok.vmap.t2s(device)[t_top] == s_top).sum())
    student.train(was_training)
    return {"student_bits_per_byte": sums["s_bits"] / max(sums["s_bytes"], 1),
            "teacher_bits_per_byte": sums["t_bits"] / max(sums["t_bytes"], 1),
            "student_bits_per_char": sums["s_bits"] / max(sums["s_chars"], 1),
            "teacher_bits_per_char": sums["t_bits"] / max(sums["t_chars"], 1),
            "kl_teacher_student": sums["kl"] / max(sums["one"], 1) if sums["one"] else None,
            "top1_agreement": sums["agree"] / max(sums["one"], 1) if sums["one"] else None,
            "aligned_share": sums["one"] / max(sums["tokens"], 1), "tokens": sums["tokens"],
            "teacher_label_in_topk": sums["t_known"] / max(sums["t_tokens"], 1)}


def _spelling(tokenizer):
    from .align import spelling

    return spelling(tokenizer).spelling


def _teacher_logprobs(targets, rows: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-prob of its own label at flattened ``rows`` (sparse: from the top-k, else the tail bound),
    and whether it is exact ``(n,)`` bool (the label is in the top-k; always for dense targets)."""
    if targets.is_sparse:
        ids, lp, tail = targets.sparse_rows(rows)
        hit = ids == labels[:, None]
        known = hit.any(-1)
        return torch.where(known, (lp * hit).sum(-1), torch.minimum(tail, lp.min(-1).values)), known
    lp = torch.log_softmax(targets.dense_logits(rows).float()[:, :vocab], -1).gather(1, labels[:, None]).squeeze(1)
    return lp, torch.ones_like(lp, dtype=torch.bool)


def _teacher_argmax(targets, rows: torch.Tensor, vocab: int) -> torch.Tensor:
    if targets.is_sparse:
        return targets.sparse_rows(rows)[0][:, 0]
    return targets.dense_logits(rows)[:, :vocab].argmax(-1)

"""A student batch seen by a teacher with another tokenizer: the same bytes, re-tokenized, and the alignment.

The student trains on its own tokens. For every row of a batch (``input_ids (B, T)``, shifted ``labels``,
``attention_mask``) the block's bytes are spelled from the student's ids (:func:`~.vocab_map.token_bytes`;
special tokens spell nothing), cut to whole UTF-8 characters at the two edges (a block of a packed stream may
start or end inside a character), decoded, and tokenized by the teacher with byte offsets
(:func:`~.align.encode_with_offsets`). :func:`~.align.align_spans` then pairs the two token lists into spans over
the same bytes, and :func:`~.align.block_alignment` says, per student label position, which teacher label
positions describe it (``(B, T_s)``). The teacher batch is the teacher's ids of each row, right-padded:
``input_ids (B, T_t)``, ``labels (B, T_t)`` (its own next tokens: the span terms need their log-probs) and
``attention_mask``. Any backend scores it (in-process, served); its targets stay in the teacher's vocabulary
and :func:`~.losses.xtok_loss` maps them onto the student's.

Chat data: rows of conversations rendered by a :class:`~.chat_data.CrossChatRenderer` (``use_chat``; the batch's
``teacher_row`` says which conversations a row holds) are read by the teacher in its *own* chat template, and only
the assistant text is aligned (:mod:`.chat_data`). Other rows (plain text) take the byte view above.

A batch that already carries its teacher view (a teacher cache serving a student of another tokenizer,
:mod:`.cached`: the teacher's block under ``teacher_*`` keys, the alignment under ``align_*`` keys) is returned
as it is: the train loop and :func:`~.evaluate.evaluate_xtok` call :meth:`CrossTokenizer.view` either way.

Cost: Python loops over the tokens, about 50-100 µs per student token (docs/cross_tokenizer.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .align import Alignment, align_spans, block_alignment, encode_with_offsets, spelling, stack_alignments
from .vocab_map import build_vocab_map

TEACHER_PREFIX, ALIGN_PREFIX = "teacher_", "align_"  # a precomputed view's keys in a student batch (.cached)


def _utf8_window(raw: bytes) -> tuple[int, int]:
    """``[lo, hi)``: ``raw`` without a character cut at either edge (continuation bytes first, a lead byte last)."""
    lo = 0
    while lo < len(raw) and lo < 4 and (raw[lo] & 0xC0) == 0x80:
        lo += 1
    hi = len(raw)
    for back in range(1, min(4, hi - lo) + 1):  # the last lead byte: is its character complete?
        b = raw[hi - back]
        if (b & 0xC0) == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        if back < need:
            hi -= back
        break
    return lo, hi


def _utf8_runs(raw: bytes, lo: int, hi: int) -> list[tuple[int, int]]:
    """The ``[a, z)`` runs of ``raw[lo:hi]`` that are valid UTF-8, in order: the teacher reads each run as text, and
    the invalid bytes between them (byte tokens sampled out of order, say) are left unaligned."""
    runs, at = [], lo
    while at < hi:
        try:
            raw[at:hi].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start:
                runs.append((at, at + exc.start))
            at += exc.start + max(exc.end - exc.start, 1)
            continue
        runs.append((at, hi))
        break
    return runs


@dataclass
class TeacherView:
    """The teacher's batch of the same bytes (``batch``), and the student positions' alignment to it."""

    batch: dict
    alignment: Alignment


def precomputed_view(batch: dict) -> TeacherView:
    """The :class:`TeacherView` a student batch carries: ``teacher_*`` keys -> the teacher's batch ``(B, T_t)``,
    ``align_kind`` / ``align_teacher_first`` / ``align_teacher_last`` / ``align_student_first`` ``(B, T_s)``."""
    t_batch = {k[len(TEACHER_PREFIX):]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
    a = {k[len(ALIGN_PREFIX):]: v for k, v in batch.items() if k.startswith(ALIGN_PREFIX)}
    alignment = Alignment(a["kind"], a["teacher_first"], a["teacher_last"], a["student_first"],
                          int(t_batch["input_ids"].shape[1]))
    return TeacherView(t_batch, alignment)


@dataclass
class TeacherRow:
    """One block row as the teacher reads it: its tokens (``input_ids = ids[:-1]``, ``labels = ids[1:]``), the spans
    (:func:`~.align.align_spans`, token indices of ``ids`` and of the student's row), and optionally, per token,
    whether it is a target (``None``: all) and its position id (``None``: ``0, 1, ...``)."""

    ids: list[int]
    spans: list[tuple[int, int, int, int]]
    targets: list[int] | None = None
    positions: list[int] | None = None


LENGTH_MULTIPLE = 16  # the teacher batch's length is rounded up to this (why: assemble_view)


def assemble_view(rows: list[TeacherRow], labels: torch.Tensor, pad: int, multiple: int = 1) -> TeacherView:
    """Right-padded teacher batch ``(B, T_t)`` (``position_ids`` too when a row has its own) and the alignment
    ``(B, T_s)`` of student label positions whose ``labels`` are targets. ``T_t`` is the longest row rounded up to
    a ``multiple``. Why: the same text gives a teacher batch of another length at every step (120 to 160 tokens for
    4 × 128 GPT-2 tokens), and new lengths grow the process for good (oneDNN keeps kernels per shape, the heap
    fragments; ``benchmarks/xtok_memory.py shapes``: SmolLM2-135M's forward at random lengths 120-160 grew 88 MB
    from the 10th to the 80th call, at one length 0). At ``LENGTH_MULTIPLE`` the lengths take three values, at ~6 %
    more teacher positions. Padding is masked and never
    a target, so the teacher's signal at the real positions is the same."""
    B, T = labels.shape
    T_t = max(max((len(r.ids) - 1 for r in rows), default=1), 1)
    T_t = -(-T_t // multiple) * multiple
    t_input = torch.full((B, T_t), pad, dtype=torch.long)
    t_labels = torch.full((B, T_t), -100, dtype=torch.long)
    t_att = torch.zeros(B, T_t, dtype=torch.long)
    with_pos = any(r.positions is not None for r in rows)
    t_pos = torch.zeros(B, T_t, dtype=torch.long) if with_pos else None
    aligns = []
    for b, r in enumerate(rows):
        n = len(r.ids) - 1
        tgt = None if r.targets is None else np.asarray(r.targets[1:], dtype=bool)
        aligns.append(block_alignment(r.spans, T, T_t, student_targets=(labels[b] != -100).numpy(), teacher_targets=tgt))
        if n < 1:
            continue
        t_input[b, :n] = torch.tensor(r.ids[:-1])
        nxt = torch.tensor(r.ids[1:])
        t_labels[b, :n] = nxt if tgt is None else nxt.masked_fill(~torch.from_numpy(tgt), -100)
        t_att[b, :n] = 1
        if with_pos:
            t_pos[b, :n] = torch.tensor(r.positions[:-1]) if r.positions is not None else torch.arange(n)
    out = {"input_ids": t_input, "labels": t_labels, "attention_mask": t_att}
    if with_pos:
        out["position_ids"] = t_pos
    return TeacherView(out, stack_alignments(aligns))


class CrossTokenizer:
    """Teacher views of student batches, and the vocabulary map between the two tokenizers."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.vmap = build_vocab_map(teacher_tokenizer, student_tokenizer)
        self._spelled = spelling(student_tokenizer).spelling
        pad = teacher_tokenizer.pad_token_id
        self._pad = pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)
        self.chat = None  # a CrossChatRenderer, when the data have conversations (use_chat)

    def row_bytes(self, ids: list[int]) -> tuple[bytes, np.ndarray]:
        """The bytes a student token row spells, and each token's ``[start, end)`` in them (``-1``: special)."""
        offsets = np.full((len(ids), 2), -1, dtype=np.int64)
        parts, at = [], 0
        for k, i in enumerate(ids):
            b = self._spelled[i] if 0 <= i < len(self._spelled) else None
            if b is None:
                continue
            offsets[k] = (at, at + len(b))
            parts.append(b)
            at += len(b)
        return b"".join(parts), offsets

    def use_chat(self, chat) -> None:
        """Chat data rendered by a :class:`~.chat_data.CrossChatRenderer`: rows of packed conversations get the
        teacher's own rendering (``batch["teacher_row"]`` says which conversations a row holds), and the
        end-of-turn pairs it found join the vocabulary map."""
        self.chat = chat
        if chat.end_pairs:
            self.vmap = build_vocab_map(self.teacher_tokenizer, self.student_tokenizer, pairs=chat.end_pairs)

    def byte_row(self, ids: torch.Tensor, labels: torch.Tensor, n: int) -> TeacherRow:
        """One row's bytes (its first ``n`` tokens and the last label), re-tokenized by the teacher, and the spans."""
        block = ids[:n].tolist()
        if n and int(labels[n - 1]) != -100:
            block.append(int(labels[n - 1]))
        return TeacherRow(*self.text_row(block))

    def text_row(self, block: list[int]) -> tuple[list[int], list[tuple[int, int, int, int]]]:
        """The teacher's tokens of the text that student tokens ``block`` spell, and the spans (token indices)."""
        raw, s_off = self.row_bytes(block)
        lo, hi = _utf8_window(raw)
        t_ids, t_offs = [], []
        for a, z in _utf8_runs(raw, lo, hi):  # bytes that spell no text (a sample's stray byte tokens) are skipped
            ids_, off_ = encode_with_offsets(self.teacher_tokenizer, raw[a:z].decode("utf-8"))
            t_ids += ids_
            t_offs.append(np.where(off_ >= 0, off_ + a, -1))
        t_off = np.concatenate(t_offs) if t_offs else np.zeros((0, 2), np.int64)
        s_off = np.where((s_off[:, :1] >= lo) & (s_off[:, 1:] <= hi), s_off, -1)  # tokens cut at the edges: out
        return t_ids, (align_spans(t_off, s_off) if len(t_ids) else [])

    def view(self, batch: dict) -> TeacherView:
        """The teacher's batch of the same text and the alignment ``(B, T_s)`` (module docstring)."""
        if TEACHER_PREFIX + "input_ids" in batch:  # mapped ahead from a teacher cache's blocks (.cached)
            return precomputed_view(batch)
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        att = batch.get("attention_mask")
        conv = batch.get("teacher_row") if self.chat is not None else None
        conv = None if conv is None else conv.cpu().numpy()
        B, T = ids.shape
        rows = []
        prompt = batch.get("prompt_len")
        for b in range(B):
            chat_row = conv is not None and bool((conv[b] >= 0).any())  # else plain text (or a text block's sample)
            if chat_row and prompt is not None:  # an on-policy sample of a chat prompt
                n, p = int(att[b].sum()) if att is not None else T, int(prompt[b])
                sample = ids[b, p:n].tolist() + ([int(labels[b, n - 1])] if n and int(labels[b, n - 1]) != -100 else [])
                rows.append(self.chat.sampled_row(conv[b], p, sample, self))
            elif chat_row:  # packed conversations: each in the teacher's template
                rows.append(self.chat.row(conv[b]))
            else:
                rows.append(self.byte_row(ids[b], labels[b], int(att[b].sum()) if att is not None else T))
        return assemble_view(rows, labels, self._pad, LENGTH_MULTIPLE)

    def loss(self, hidden: torch.Tensor, head, targets, view: TeacherView, labels: torch.Tensor, loss_cfg,
             chunk_rows: int, ce_weight: float = 0.0, ce_stats: dict | None = None) -> torch.Tensor:
        """Sum over the student's target positions of the cross-tokenizer KD term (``loss.xtok_method`` and the
        span term at ``loss.xtok_span_weight``), a scalar with gradients to ``hidden`` and the head; with
        ``ce_weight`` / ``ce_stats``, plus ``ce_weight ·`` the CE sum where :func:`~.losses.xtok_loss` can fold it
        in (then ``ce_stats`` says so)."""
        from .losses import StudentHead, xtok_loss

        device = hidden.device
        per_token = xtok_loss(StudentHead(hidden, head.weight, head.bias), targets, view.alignment.to(device), self.vmap,
                              student_labels=labels, teacher_labels=view.batch["labels"].to(device),
                              method=loss_cfg.xtok_method, span_weight=loss_cfg.xtok_span_weight,
                              loss_temperature=loss_cfg.loss_temperature, chunk_size=chunk_rows,
                              ce_weight=ce_weight, ce_stats=ce_stats)
        return per_token.sum()

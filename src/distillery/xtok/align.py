"""Align two tokenizations of the same text into spans that start and end at the same byte.

**Byte offsets.** A fast tokenizer reports character offsets (``return_offsets_mapping``); they are turned into
UTF-8 byte offsets so that tokens splitting a character can be placed. Tokens whose character ranges overlap (a
byte-level BPE cutting an emoji into ``ðŁĺ`` + ``Ģ``, SentencePiece byte fallback ``<0xF0><0x9F><0x98><0x80>``, both
reported on the emoji's one character) form a group covering the union of their ranges. When the group's token byte
lengths (:func:`distillery.xtok.vocab_map.token_bytes`) add up to the group's byte length, each token gets its exact
bytes by cumulative sum; otherwise (a SentencePiece ``▁`` prepended to the first word, which the text does not
contain) the bytes are assigned from the right and the leftmost token absorbs the rest, so the phantom ``▁`` becomes
zero-width and joins the following span. Special tokens get ``(-1, -1)``: they are excluded, and a span never
crosses the text they cover. The backend tokenizer is run without its post-processor, so no offset trimming applies.

**Spans** (:func:`align_spans`). Walking both token lists, a span opens where a teacher token and a student token
start at the same byte and closes at the first byte where both sides end a token; inside it, each side's tokens
must be contiguous (no gap, no excluded token). So a span is 1↔1, 1↔n, n↔1 or n↔m tokens over the same bytes.
Tokens that start at different bytes after a gap are skipped until both sides restart together.

**Positions** (:func:`block_alignment`). With distillery's shifted labels, token ``k`` of a block is predicted at
label position ``k − 1``. For each *student* label position the :class:`Alignment` says which kind of span it is in
and which teacher label positions the span covers, ready for :mod:`distillery.xtok.losses`. Spans that contain a
side's token 0 (never predicted) or a token that is not a target on either side are dropped.

Costs: linear Python loops over the tokens: about 45–95 µs per student token including both tokenizations
(measured on 200k characters of Shakespeare, SmolLM2 vs GPT-2 / an 8k BPE), so align in data preparation, not per step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DistilleryError
from .vocab_map import TokenBytes, token_bytes

NONE, ONE, START, INSIDE, END, MERGED = 0, 1, 2, 3, 4, 5
KIND_NAMES = {NONE: "none", ONE: "1-1", START: "start", INSIDE: "inside", END: "end", MERGED: "1-m"}


def backend_for_offsets(tokenizer):
    """A copy of the backend tokenizer with no post-processor (some trim offsets there), cached per object and size
    (keyed without serialising it: ``to_str()`` of a 50k vocabulary takes 30-70 ms, 15x the alignment of a block)."""
    return _copy_backend(tokenizer, len(tokenizer))


@functools.lru_cache(maxsize=8)
def _copy_backend(tokenizer, _size: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.post_processor = None
    return tok


@functools.lru_cache(maxsize=8)
def _spelled(_key: int, tokenizer) -> TokenBytes:
    return token_bytes(tokenizer)


def spelling(tokenizer) -> TokenBytes:
    """:func:`~distillery.xtok.vocab_map.token_bytes` of ``tokenizer``, cached per object."""
    return _spelled(id(tokenizer), tokenizer)


def utf8_prefix(text: str) -> np.ndarray:
    """``(len(text) + 1,)`` int64: the UTF-8 byte offset of every character boundary of ``text``."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def byte_offsets(text: str, ids: list[int], char_offsets: list[tuple[int, int]], spelled: TokenBytes,
                 prefix: np.ndarray | None = None) -> np.ndarray:
    """``(N, 2)`` int64 UTF-8 byte ``[start, end)`` of each token of ``text`` (module docstring); ``-1`` = excluded."""
    prefix = utf8_prefix(text) if prefix is None else prefix
    out = np.full((len(ids), 2), -1, dtype=np.int64)
    group: list[int] = []
    lo = hi = -1  # the current group's character range

    def flush() -> None:
        b_lo, b_hi = int(prefix[lo]), int(prefix[hi])
        lengths = [len(spelled.spelling[ids[k]] or b"") for k in group]
        if sum(lengths) == b_hi - b_lo:
            at = b_lo
            for k, n in zip(group, lengths):
                out[k] = (at, at + n)
                at += n
            return
        end = b_hi
        for k, n in zip(group[:0:-1], lengths[:0:-1]):  # right to left, all but the first
            start = max(end - n, b_lo)
            out[k] = (start, end)
            end = start
        out[group[0]] = (b_lo, end)

    for k, (i, (c0, c1)) in enumerate(zip(ids, char_offsets)):
        if i >= len(spelled.spelling) or spelled.spelling[i] is None:
            continue  # special: excluded
        if group and c0 < hi:  # overlaps the open group (a character split between tokens)
            group.append(k)
            hi = max(hi, c1)
            continue
        if group:
            flush()
        group, lo, hi = [k], c0, c1
    if group:
        flush()
    return out


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` (no special tokens added) and their ``(N, 2)`` byte offsets (``-1`` = special)."""
    enc = backend_for_offsets(tokenizer).encode(text, add_special_tokens=False)
    return list(enc.ids), byte_offsets(text, enc.ids, enc.offsets, spelling(tokenizer))


def align_spans(teacher_offsets: np.ndarray, student_offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Spans ``(t_lo, t_hi, s_lo, s_hi)``: teacher tokens ``t_lo..t_hi-1`` and student tokens ``s_lo..s_hi-1`` cover
    the same bytes, both contiguous, with no shorter common boundary inside (module docstring).

    ``(N, 2)`` / ``(M, 2)`` byte offsets, ``-1`` rows excluded; offsets must be non-decreasing.
    """
    t_ok = np.flatnonzero(teacher_offsets[:, 0] >= 0)
    s_ok = np.flatnonzero(student_offsets[:, 0] >= 0)
    ts, te = teacher_offsets[t_ok, 0].tolist(), teacher_offsets[t_ok, 1].tolist()
    ss, se = student_offsets[s_ok, 0].tolist(), student_offsets[s_ok, 1].tolist()
    t_idx, s_idx = t_ok.tolist(), s_ok.tolist()
    spans = []
    i = j = 0
    n, m = len(ts), len(ss)
    while i < n and j < m:
        if ts[i] != ss[j]:  # not a common start: skip the side that starts earlier
            if ts[i] < ss[j]:
                i += 1
            else:
                j += 1
            continue
        i0, j0, x, a, b = i, j, ts[i], te[i], se[j]
        ok = True
        while a != b or a == x:  # a span closes at a common end past its start (zero-width tokens join the next)
            if a <= b:
                i += 1
                if i >= n or ts[i] != a or t_idx[i] != t_idx[i - 1] + 1:
                    ok = False
                    break
                a = te[i]
            else:
                j += 1
                if j >= m or ss[j] != b or s_idx[j] != s_idx[j - 1] + 1:
                    ok = False
                    break
                b = se[j]
        if ok:
            spans.append((t_idx[i0], t_idx[i] + 1, s_idx[j0], s_idx[j] + 1))
            i += 1
            j += 1
    return spans


@dataclass
class Alignment:
    """Per student label position, the aligned span it belongs to. All fields ``(B, T_s)``.

    Fields:
        kind: int8 — ``NONE`` (no teacher counterpart), ``ONE`` (1 student token ↔ 1 teacher token), ``START`` /
            ``INSIDE`` / ``END`` (first / middle / last student token of a span with several student tokens, 1↔n or
            n↔m), ``MERGED`` (1 student token ↔ several teacher tokens).
        teacher_first / teacher_last: int64 — the teacher label positions predicting the span's first / last teacher
            token (rows of the teacher's ``(B, T_t)`` targets); ``-1`` where ``kind == NONE``.
        student_first: int64 — the student label position of the span's first student token; ``-1`` for ``NONE``.
        teacher_len: ``T_t``, the teacher's label length (the width of its targets).
    """

    kind: torch.Tensor
    teacher_first: torch.Tensor
    teacher_last: torch.Tensor
    student_first: torch.Tensor
    teacher_len: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)  # type: ignore[return-value]

    def counts(self) -> dict[str, int]:
        """How many student positions fall in each kind (for logs and reports)."""
        return {KIND_NAMES[k]: int((self.kind == k).sum()) for k in KIND_NAMES}

    def to(self, device) -> "Alignment":
        return Alignment(self.kind.to(device), self.teacher_first.to(device), self.teacher_last.to(device),
                         self.student_first.to(device), self.teacher_len)


def block_alignment(spans: list[tuple[int, int, int, int]], student_len: int, teacher_len: int,
                    student_targets: np.ndarray | None = None, teacher_targets: np.ndarray | None = None,
                    teacher_shift: int = 0, student_shift: int = 0) -> Alignment:
    """The :class:`Alignment` ``(1, T_s)`` of one block from token spans (:func:`align_spans`).

    Token ``k`` (in span coordinates) is the block's token ``k - shift`` and is predicted at label position
    ``k - shift - 1`` (``student_len = T_s`` / ``teacher_len = T_t`` label positions). A span is kept when every token
    of it lies in ``1..T`` on both sides and is a target there: ``student_targets (T_s,)`` / ``teacher_targets
    (T_t,)`` bool per label position (``labels != -100``), ``None`` = all.
    """
    kind = np.zeros(student_len, dtype=np.int8)
    tf = np.full(student_len, -1, dtype=np.int64)
    tl, sf = tf.copy(), tf.copy()
    for t_lo, t_hi, s_lo, s_hi in spans:
        a, b = t_lo - teacher_shift - 1, t_hi - teacher_shift - 1  # teacher label positions [a, b)
        c, d = s_lo - student_shift - 1, s_hi - student_shift - 1
        if a < 0 or c < 0 or b > teacher_len or d > student_len:
            continue
        if student_targets is not None and not student_targets[c:d].all():
            continue
        if teacher_targets is not None and not teacher_targets[a:b].all():
            continue
        tf[c:d], tl[c:d], sf[c:d] = a, b - 1, c
        if d - c == 1:
            kind[c] = ONE if b - a == 1 else MERGED
        else:
            kind[c], kind[c + 1:d - 1], kind[d - 1] = START, INSIDE, END
    return Alignment(torch.from_numpy(kind)[None], torch.from_numpy(tf)[None], torch.from_numpy(tl)[None],
                     torch.from_numpy(sf)[None], teacher_len)


def stack_alignments(blocks: list[Alignment]) -> Alignment:
    """Stack ``(1, T_s)`` alignments of equal ``T_s`` into ``(B, T_s)``; ``teacher_len`` is the largest ``T_t``."""
    if not blocks or len({b.shape[1] for b in blocks}) != 1:
        raise DistilleryError("stack_alignments needs at least one block, all of the same student length")
    cat = lambda name: torch.cat([getattr(b, name) for b in blocks])  # noqa: E731
    return Alignment(cat("kind"), cat("teacher_first"), cat("teacher_last"), cat("student_first"),
                     max(b.teacher_len for b in blocks))


@dataclass
class TextAlignment:
    """Both tokenizations of one text: ids, byte offsets ``(N, 2)`` / ``(M, 2)``, and their spans."""

    teacher_ids: list[int]
    student_ids: list[int]
    teacher_offsets: np.ndarray
    student_offsets: np.ndarray
    spans: list[tuple[int, int, int, int]]

    def alignment(self) -> Alignment:
        """The whole text as one block: ``input_ids = ids[:-1]``, ``labels = ids[1:]`` on each side."""
        return block_alignment(self.spans, len(self.student_ids) - 1, len(self.teacher_ids) - 1)


def align_text(text: str, teacher_tokenizer, student_tokenizer) -> TextAlignment:
    """Tokenize ``text`` with both tokenizers (no special tokens added) and align the tokens."""
    t_ids, t_off = encode_with_offsets(teacher_tokenizer, text)
    s_ids, s_off = encode_with_offsets(student_tokenizer, text)
    return TextAlignment(t_ids, s_ids, t_off, s_off, align_spans(t_off, s_off))

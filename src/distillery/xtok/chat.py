"""Chat data across tokenizers: each side renders the conversation with its *own* chat template; only the assistant's
text is aligned and trained on.

For each assistant turn ``i`` a side's rendering gives three character positions (as in
:mod:`distillery.data.chat`'s prefix rule): where the assistant starts (the end of ``messages[:i]`` rendered with
``add_generation_prompt=True``), where its content lies (``content`` found there), and where the turn ends (the end of
``messages[:i+1]``, trailing whitespace left out). The assistant mask marks the tokens starting between the first and
the last (content plus end-of-turn token, as distillery's chat data). Tokens inside the content get *content
coordinates* — turn ``r``'s byte ``x`` becomes ``base_r + x`` with a one-byte gap between turns — and are aligned with
:func:`~distillery.xtok.align.align_spans`; template text and special tokens are excluded. Each side's end-of-turn
token (the first token after the content, e.g. ``<|im_end|>`` vs ``<|eot_id|>``) is paired 1↔1 when both sides'
content tokens end exactly at the content's end and both end tokens are assistant targets; its id pairs are returned
so the vocabulary map can match them (``build_vocab_map(..., pairs=chat.end_pairs)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DistilleryError
from .align import (Alignment, backend_for_offsets, align_spans, block_alignment, byte_offsets,
                    spelling, utf8_prefix)


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DistilleryError("cross-tokenizer chat data needs both tokenizers to have a chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja errors from the template
        raise DistilleryError(f"the chat template failed on this conversation ({exc})") from None


@dataclass
class _Side:
    ids: list[int]
    mask: list[int]
    offsets: np.ndarray  # content coordinates, -1 outside assistant content
    ends: list[int]  # per assistant turn: index of the first token after its content (-1 if none)
    closed: list[bool]  # per turn: some content token ends exactly at the content's end


def _side(tokenizer, messages: list[dict], where: str) -> _Side:
    full = _render(tokenizer, messages)
    turns = []  # (assistant start char, content lo char, content hi char, turn end char)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[:i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DistilleryError(f"{where}: the chat template does not render messages[:{i}] as a prefix of the "
                                  f"conversation, so assistant turn {i} cannot be located")
        content = str(m.get("content", ""))
        lo = upto.find(content, len(before)) if content else len(before)
        if lo < 0:
            content = content.strip()
            lo = upto.find(content, len(before))
        if lo < 0:
            raise DistilleryError(f"{where}: the content of assistant turn {i} does not appear in its rendering "
                                  "(the chat template rewrites it)")
        turns.append((len(before), lo, lo + len(content), len(upto.rstrip())))
    enc = backend_for_offsets(tokenizer).encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    chars = np.array([c0 for c0, _ in enc.offsets], dtype=np.int64).reshape(-1)  # start character of every token
    prefix = utf8_prefix(full)
    offs = byte_offsets(full, ids, enc.offsets, spelling(tokenizer), prefix)  # -1 on special tokens
    mask = np.zeros(len(ids), dtype=bool)
    coords = np.full((len(ids), 2), -1, dtype=np.int64)
    ends, closed, base = [], [], 0
    for a_start, lo, hi, t_end in turns:
        mask |= (chars >= a_start) & (chars < t_end)  # distillery.data.chat's rule: the token starts in the turn
        b_lo, b_hi = int(prefix[lo]), int(prefix[hi])
        inside = (offs[:, 0] >= b_lo) & (offs[:, 1] <= b_hi)
        coords[inside] = offs[inside] - b_lo + base
        after = np.flatnonzero((chars >= hi) & ~inside)
        ends.append(int(after[0]) if after.size else -1)
        closed.append(bool((inside & (offs[:, 1] == b_hi)).any()))
        base += b_hi - b_lo + 1
    return _Side(ids, mask.astype(np.int64).tolist(), coords, ends, closed)


@dataclass
class ChatAlignment:
    """Both renderings of one conversation and their alignment over the assistant text.

    ``*_ids`` are the tokens of each side's rendered conversation (no special tokens added, as ``apply_chat_template``
    tokenizes), ``*_mask`` the assistant tokens (1 = a training target), ``spans`` token-index spans
    (:func:`~distillery.xtok.align.align_spans`), ``end_pairs`` the ``(teacher_id, student_id)`` end-of-turn pairs.
    """

    teacher_ids: list[int]
    teacher_mask: list[int]
    student_ids: list[int]
    student_mask: list[int]
    spans: list[tuple[int, int, int, int]]
    end_pairs: list[tuple[int, int]]

    def alignment(self) -> Alignment:
        """The conversation as one block (``input_ids = ids[:-1]``, ``labels = ids[1:]`` masked by the assistant mask)."""
        return block_alignment(self.spans, len(self.student_ids) - 1, len(self.teacher_ids) - 1,
                               np.asarray(self.student_mask[1:], dtype=bool), np.asarray(self.teacher_mask[1:], dtype=bool))


def align_chat(messages: list[dict], teacher_tokenizer, student_tokenizer, where: str = "conversation") -> ChatAlignment:
    """Render ``messages`` with each side's chat template and align the assistant text (module docstring)."""
    t = _side(teacher_tokenizer, messages, where)
    s = _side(student_tokenizer, messages, where)
    spans = align_spans(t.offsets, s.offsets)
    pairs = []
    for te, se, tc, sc in zip(t.ends, s.ends, t.closed, s.closed):
        if te >= 0 and se >= 0 and tc and sc and t.mask[te] and s.mask[se]:
            spans.append((te, te + 1, se, se + 1))
            pairs.append((t.ids[te], s.ids[se]))
    spans.sort()
    return ChatAlignment(t.ids, t.mask, s.ids, s.mask, spans, sorted(set(pairs)))

"""Chat data across tokenizers in a run: each side reads the conversation in its *own* chat template.

The student trains on its own rendering of every conversation (its template, its tokens, its assistant mask); the
teacher scores *its* rendering of the same messages; only the assistant text (plus the end-of-turn token pair) is
aligned, by :func:`~distillery.xtok.chat.align_chat`. Two pieces wire this into the data pipeline and the loop:

* :class:`CrossChatRenderer` — the ``chat_renderer`` hook of :func:`distillery.data.build.build_blocks`: for every
  conversation it returns the student's ids and assistant mask and, per student token, a row of its own side table
  (``row = first_row[c] + k`` for token ``k`` of conversation ``c``). The packed dataset then carries
  ``teacher_row (B, T)`` (the row of each *label*, i.e. of token ``t + 1``), which says which conversation, and which
  token of it, every block position holds. The renderer keeps each conversation's :class:`~.chat.ChatAlignment`.
* :meth:`CrossChatRenderer.row` — a block row of packed conversations -> the teacher's row
  (:class:`~.batch.TeacherRow`; :meth:`~.batch.CrossTokenizer.view` assembles the batch and the
  :class:`~.align.Alignment` ``(B, T_s)``): the teacher's renderings of the row's conversations
  concatenated in the same order (``input_ids = ids[:-1]``, ``labels = ids[1:]`` where the teacher's token is an
  assistant token, else ``-100``; ``position_ids`` restart at 0 with every conversation, as the student's do), and the
  conversations' spans shifted to where each starts on either side. A conversation the student side cut at
  ``seq_len + 1`` tokens keeps its whole teacher rendering; spans past the cut are dropped by
  :func:`~.align.block_alignment`.

Why not the plain byte view (:class:`~.batch.CrossTokenizer`): it would show the teacher the *student's* template as
text (``<|user|>`` spelled out in the teacher's tokens), a prompt format the teacher was never trained on, and would
align template text as if it were content.
"""

from __future__ import annotations

import numpy as np

from .chat import ChatAlignment, align_chat


class CrossChatRenderer:
    """Renders conversations for the student and remembers both sides' renderings (module docstring).

    ``name`` goes into the data fingerprint: the student's token ids of chat data come from this renderer.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer):
        from ..data.build import tokenizer_hash

        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.name = f"xtok-chat:{tokenizer_hash(teacher_tokenizer)[:16]}"
        self.conversations: list[ChatAlignment] = []
        self._first = [0]  # first side-table row of each conversation, and one past the last
        self._cache: tuple = (-1, None, ())  # (conversations seen, first rows as an array, end pairs): made once

    def __call__(self, record) -> tuple[list[int], list[int], list[int]]:
        """``(student ids, student assistant mask, side-table rows)`` of one conversation record."""
        from ..data.chat import prepare_messages

        messages = prepare_messages(record.messages, self.student_tokenizer, record.where)
        chat = align_chat(messages, self.teacher_tokenizer, self.student_tokenizer, where=record.where)
        first = self._first[-1]
        self.conversations.append(chat)
        self._first.append(first + len(chat.student_ids))
        return list(chat.student_ids), list(chat.student_mask), list(range(first, first + len(chat.student_ids)))

    def _frozen(self) -> tuple:
        """The first rows as an array and the end pairs, computed again only when conversations were added."""
        if self._cache[0] != len(self.conversations):
            pairs = tuple(sorted({p for c in self.conversations for p in c.end_pairs}))
            self._cache = (len(self.conversations), np.asarray(self._first), pairs)
        return self._cache

    @property
    def end_pairs(self) -> tuple[tuple[int, int], ...]:
        """Every ``(teacher_id, student_id)`` end-of-turn pair seen (for ``build_vocab_map(pairs=...)``)."""
        return self._frozen()[2]

    def _members(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """``(conversation, start token in the block)`` of each conversation in one block row, in order.

        ``rows (T,)`` are the side-table rows of tokens ``1..T`` (``-1``: padding). A block starts with a whole
        conversation, so token 0 belongs to the conversation of token 1 (or is padding)."""
        members: list[tuple[int, int]] = []
        first = self._frozen()[1]
        for t in np.flatnonzero(rows >= 0):
            c = int(np.searchsorted(first, rows[t], side="right")) - 1
            if not members or members[-1][0] != c:
                members.append((c, int(t) + 1 - int(rows[t] - first[c])))
        return members

    def row(self, rows: np.ndarray):
        """One block row of packed conversations as the teacher reads it: a :class:`~.batch.TeacherRow` of the
        teacher's renderings of the row's conversations, their assistant masks, positions restarting at 0 with each
        conversation, and the conversations' spans shifted to where each starts on either side."""
        from .batch import TeacherRow

        seq, pos, tgt, spans = [], [], [], []
        for c, s_start in self._members(rows):
            chat = self.conversations[c]
            u = len(seq)
            seq += chat.teacher_ids
            pos += range(len(chat.teacher_ids))
            tgt += chat.teacher_mask
            spans += [(t0 + u, t1 + u, s0 + s_start, s1 + s_start) for t0, t1, s0, s1 in chat.spans]
        return TeacherRow(seq, spans, tgt, pos)

    def sampled_row(self, rows: np.ndarray, prompt_len: int, sample: list[int], cross):
        """An on-policy row: the prompt of the row's first conversation as the teacher renders it (up to its first
        assistant token), then the student's ``sample`` (the tokens after its ``prompt_len``-token prompt) as text
        in the teacher's tokens, then the teacher's end of turn where the sample ends with the student's. Spans cover
        the sample alone (``cross`` spells and re-tokenizes it, :meth:`~.batch.CrossTokenizer.text_row`)."""
        from .batch import TeacherRow

        members = self._members(rows)
        if not members:
            return TeacherRow([], [])
        chat = self.conversations[members[0][0]]
        t_prompt = chat.teacher_ids[:chat.teacher_mask.index(1)] if 1 in chat.teacher_mask else list(chat.teacher_ids)
        ends = dict((s, t) for t, s in self.end_pairs)
        tail = [ends[sample[-1]]] if sample and sample[-1] in ends else []
        body = sample[:-1] if tail else sample
        t_ids, spans = cross.text_row(body) if body else ([], [])
        u = len(t_prompt)
        spans = [(a + u, b + u, c + prompt_len, d + prompt_len) for a, b, c, d in spans]
        if tail:
            at = u + len(t_ids)
            spans.append((at, at + 1, prompt_len + len(body), prompt_len + len(body) + 1))
        ids = list(t_prompt) + list(t_ids) + tail
        return TeacherRow(ids, spans, [0] * u + [1] * (len(ids) - u), list(range(len(ids))))


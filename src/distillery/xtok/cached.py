"""A teacher cache written once, in the teacher's tokenization, serving a student with any tokenizer.

The data are built with the **teacher's** tokenizer exactly as the cache was (same blocks, same ``index``, the
data fingerprint checked as for any cache). :class:`StudentBlocks` wraps that teacher-tokenized
:class:`~distillery.data.pack.BlockDataset` and hands the train loop **student** batches: student block ``i``
is the same bytes as teacher block ``i``, re-tokenized by the student, and carries the teacher's block ``i``
(with its ``index``, so :class:`~distillery.teachers.cached.CachedTeacher` reads its targets unchanged) and the
alignment of the two, i.e. a ready :class:`~.batch.TeacherView` (:meth:`CrossTokenizer.view` returns it).

Per teacher block (``T + 1`` tokens ``u_0..u_T``, padding dropped):

1. spell every token to bytes (:func:`~.vocab_map.token_bytes`); a **special** token (EOS between documents,
   ``<|im_start|>``…) spells nothing and cuts the block into text segments;
2. decode each segment's valid UTF-8 runs (:func:`~.batch._utf8_runs`): a character cut at either edge (a
   byte-level block may start or end inside one) and a stray byte between runs (a byte-fallback token of a
   sample) are skipped, as ``CrossTokenizer.text_row`` does; tokenize each run with the student
   (:func:`~.align.encode_with_offsets`, no special tokens added);
3. a teacher special becomes the student's special with the same content (``<|endoftext|>`` ↔ ``<|endoftext|>``),
   else the teacher's EOS becomes the student's EOS, else it is dropped; specials are never aligned (offsets -1);
4. the student row is the concatenation ``s_0..s_{M-1}``: ``input_ids = s[:-1]``, ``labels = s[1:]``;
5. **targets.** Teacher token ``j ≥ 1`` is a target iff ``labels[j-1] != -100``. A student text token is a target
   iff the teacher token holding its **last byte** is one (a zero-width token: the byte it stands before); a
   mapped special iff its teacher special is. Neighbouring text blocks share the token ``u_T`` = next ``u_0``,
   which is a target only in the earlier block, so with the last-byte rule every byte is a student target once;
   in chat data only the assistant bytes are;
6. :func:`~.align.align_spans` + :func:`~.align.block_alignment` give the :class:`~.align.Alignment` ``(1, L)``
   (``L = min(M - 1, max_len)`` label positions, ``T_t = T``).

A batch is right-padded to its longest student row (``W`` = max ``L`` of the batch; a student tokenizer with a
smaller vocabulary makes longer rows than ``data.seq_len``): ``input_ids``/``labels``/``attention_mask (B, W)``
(pad id, -100, 0), ``index (B,)``, and ``position_ids (B, W)`` for packed conversations (restarting where the
teacher's restart; padding counts from 0). The teacher's block batch travels under ``teacher_*`` keys, the
alignment under ``align_*`` keys (:data:`~.batch.VIEW_KEYS`): all tensors, so ``.to(device)`` and the loop's
other code paths need nothing new.

The mapping (Python loops, ~50-100 µs per token) is done once per block and kept in memory, least recently used
first out beyond ``cache_tokens`` student tokens (about 26 bytes per token: ids, labels, alignment).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .align import align_spans, block_alignment, encode_with_offsets, spelling
from .batch import ALIGN_PREFIX, TEACHER_PREFIX, _utf8_runs


@dataclass
class MappedBlock:
    """One teacher block re-tokenized by the student. ``L`` label positions; all arrays ``(L,)``.

    ``ids`` ``(L + 1,)`` int32 are the student tokens ``s_0..s_L`` (``input_ids = ids[:-1]``); ``labels`` int32 with
    -100 off target; ``positions`` int32 or None (text); ``kind`` int8, ``teacher_first`` / ``teacher_last`` /
    ``student_first`` int32: the :class:`~.align.Alignment` row.
    """

    ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray | None
    kind: np.ndarray
    teacher_first: np.ndarray
    teacher_last: np.ndarray
    student_first: np.ndarray

    @property
    def n_labels(self) -> int:
        return int(self.labels.shape[0])


class StudentBlocks:
    """Student batches over a teacher-tokenized :class:`~distillery.data.pack.BlockDataset` (module docstring).

    Args:
        blocks: the teacher's blocks (what the cache was written for).
        xtok: the :class:`~.batch.CrossTokenizer` of the pair (its two tokenizers and vocabulary map).
        max_len: the student's longest row (its ``max_position_embeddings``); longer rows lose their last tokens
            (spans reaching past the cut are not aligned). None = no limit.
        cache_tokens: the most student tokens whose mapping is kept in memory.
    """

    def __init__(self, blocks, xtok, max_len: int | None = None, cache_tokens: int = 1 << 23):
        self.blocks, self.xtok, self.max_len, self.cache_tokens = blocks, xtok, max_len, int(cache_tokens)
        self.seq_len = blocks.seq_len  # the teacher's T (the student's rows are as long as the bytes need)
        s_tok = xtok.student_tokenizer
        self._t_spell = spelling(xtok.teacher_tokenizer)
        s_special = spelling(s_tok).special
        t_eos = xtok.teacher_tokenizer.eos_token_id
        # teacher special id -> student id: the same content, else EOS for EOS (step 3 of the module docstring)
        self._special = {t: s_special[c] for c, t in self._t_spell.special.items() if c in s_special}
        if t_eos is not None and t_eos not in self._special and s_tok.eos_token_id is not None:
            self._special[t_eos] = s_tok.eos_token_id
        pad = s_tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (s_tok.eos_token_id or 0))
        self._memo: OrderedDict[int, MappedBlock] = OrderedDict()
        self._memo_tokens = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def mapped(self, i: int) -> MappedBlock:
        """Block ``i`` mapped to the student (kept in memory, LRU beyond ``cache_tokens``)."""
        i = int(i)
        hit = self._memo.get(i)
        if hit is not None:
            self._memo.move_to_end(i)
            return hit
        m = self._map(i)
        self._memo[i] = m
        self._memo_tokens += m.n_labels + 1
        while self._memo_tokens > self.cache_tokens and len(self._memo) > 1:
            _, old = self._memo.popitem(last=False)
            self._memo_tokens -= old.n_labels + 1
        return m

    def _teacher_block(self, i: int):
        """``(ids, target, positions | None)`` of block ``i``'s real tokens (``n ≤ T + 1``); ``target[j]``: token ``j``
        is a teacher label (``target[0]`` is False: never predicted in this block)."""
        ds = self.blocks
        pos = ds.starts[i] + torch.arange(ds.seq_len + 1)
        ids = ds.tokens[pos].numpy().astype(np.int64)
        target = np.ones(len(ids), bool) if ds.targets is None else ds.targets[pos].numpy().copy()
        target[0] = False
        n = len(ids)
        if ds.real is not None:
            pad = np.flatnonzero(~ds.real[pos].numpy())
            n = int(pad[0]) if len(pad) else n  # padding sits at a block's end (pack_chat)
        positions = None if ds.positions is None else ds.positions[pos].numpy()[:n]
        return ids[:n], target[:n], positions

    def _map(self, i: int) -> MappedBlock:
        t_ids, t_tgt, t_pos = self._teacher_block(i)
        n, T = len(t_ids), self.seq_len
        spelled = self._t_spell.spelling
        t_off = np.full((n, 2), -1, dtype=np.int64)
        parts, at = [], 0
        for j, u in enumerate(t_ids.tolist()):
            b = spelled[u] if 0 <= u < len(spelled) else None
            if b is not None:
                t_off[j] = (at, at + len(b))
                parts.append(b)
                at += len(b)
        raw = b"".join(parts)
        owner = np.full(len(raw) + 1, -1, dtype=np.int64)  # byte -> the teacher token spelling it
        for j in np.flatnonzero(t_off[:, 1] > t_off[:, 0]).tolist():
            owner[t_off[j, 0]:t_off[j, 1]] = j

        s_ids: list[int] = []
        s_off: list[np.ndarray] = []
        s_tgt: list[np.ndarray] = []
        s_src: list[np.ndarray] = []  # the teacher token each student token comes from (conversation of chat data)
        j = 0
        while j < n:
            if t_off[j, 0] < 0:  # a special: the student's counterpart, unaligned
                s = self._special.get(int(t_ids[j]))
                if s is not None:
                    s_ids.append(s)
                    s_off.append(np.array([[-1, -1]]))
                    s_tgt.append(np.array([t_tgt[j]]))
                    s_src.append(np.array([j]))
                j += 1
                continue
            k = j
            while k < n and t_off[k, 0] >= 0:
                k += 1
            seg_lo, seg_hi = int(t_off[j, 0]), int(t_off[k - 1, 1])  # text tokens j..k-1
            # the valid text: a character cut at either edge and stray bytes between runs are skipped, as
            # CrossTokenizer.text_row reads a sample
            runs = _utf8_runs(raw, seg_lo, seg_hi)
            inside = np.zeros(k - j, bool)
            for a, z in runs:
                inside |= (t_off[j:k, 0] >= a) & (t_off[j:k, 1] <= z)
            t_off[j:k][~inside] = -1  # teacher tokens cut at the edges or spelling no text: never aligned
            for a, z in runs:
                ids, off = encode_with_offsets(self.xtok.student_tokenizer, raw[a:z].decode("utf-8"))
                off = np.where(off >= 0, off + a, -1)
                last = np.where(off[:, 1] > off[:, 0], off[:, 1] - 1, off[:, 0])  # step 5: the last byte
                src = np.where(off[:, 0] >= 0, owner[np.clip(last, 0, len(raw))], -1)
                s_ids.extend(ids)
                s_off.append(off)
                s_tgt.append(np.where(src >= 0, t_tgt[np.maximum(src, 0)], False))
                s_src.append(np.where(src >= 0, src, j))
            j = k

        M = len(s_ids)
        off = np.concatenate(s_off) if s_off else np.zeros((0, 2), np.int64)
        tgt = np.concatenate(s_tgt) if s_tgt else np.zeros(0, bool)
        L = max(M - 1, 0) if self.max_len is None else min(max(M - 1, 0), int(self.max_len))
        spans = align_spans(t_off, off) if M > 1 and n > 1 else []
        t_targets = np.zeros(T, bool)
        t_targets[:max(n - 1, 0)] = t_tgt[1:n]
        al = block_alignment(spans, L, T, student_targets=tgt[1:L + 1], teacher_targets=t_targets)
        ids = np.asarray(s_ids[:L + 1], dtype=np.int32)
        labels = np.where(tgt[1:L + 1], ids[1:L + 1], -100).astype(np.int32)
        positions = None
        if t_pos is not None:  # a conversation starts where the teacher's input positions restart
            conv = np.cumsum(t_pos == 0)
            if n > T:
                conv[T] = conv[T - 1]  # u_T is never an input here: it starts nothing
            s_conv = conv[np.concatenate(s_src)[:L]] if s_src else np.zeros(0, np.int64)
            positions = (np.arange(len(s_conv)) - np.searchsorted(s_conv, s_conv, side="left")).astype(np.int32)
        narrow = lambda t: t[0].numpy().astype(np.int32)  # noqa: E731
        return MappedBlock(ids, labels, positions, al.kind[0].numpy(), narrow(al.teacher_first),
                           narrow(al.teacher_last), narrow(al.student_first))

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Student blocks ``indices`` as one batch, with the teacher's blocks and the alignment (module docstring)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        rows = [self.mapped(i) for i in idx.tolist()]
        B, W = len(rows), max([1] + [r.n_labels for r in rows])
        input_ids = torch.full((B, W), self.pad_id, dtype=torch.long)
        labels = torch.full((B, W), -100, dtype=torch.long)
        attention = torch.zeros(B, W, dtype=torch.long)
        kind = torch.zeros(B, W, dtype=torch.int8)
        t_first, t_last, s_first = (torch.full((B, W), -1, dtype=torch.long) for _ in range(3))
        chat = self.blocks.positions is not None
        positions = torch.arange(W).repeat(B, 1) if chat else None
        for b, r in enumerate(rows):
            L = r.n_labels
            if L == 0:  # nothing to learn in this block (e.g. all of it special): one attended pad
                attention[b, 0] = 1
                continue
            input_ids[b, :L] = torch.from_numpy(r.ids[:L].astype(np.int64))
            labels[b, :L] = torch.from_numpy(r.labels.astype(np.int64))
            attention[b, :L] = 1
            kind[b, :L] = torch.from_numpy(r.kind)
            t_first[b, :L], t_last[b, :L] = torch.from_numpy(r.teacher_first), torch.from_numpy(r.teacher_last)
            s_first[b, :L] = torch.from_numpy(r.student_first)
            if positions is not None:
                positions[b, :L] = torch.from_numpy(r.positions.astype(np.int64))
                positions[b, L:] = torch.arange(W - L)  # padding: one more "conversation" (pack.pack_chat)
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "index": idx}
        if positions is not None:
            out["position_ids"] = positions
        out.update({TEACHER_PREFIX + k: v for k, v in self.blocks.batch(idx).items()})
        out.update({ALIGN_PREFIX + "kind": kind, ALIGN_PREFIX + "teacher_first": t_first,
                    ALIGN_PREFIX + "teacher_last": t_last, ALIGN_PREFIX + "student_first": s_first})
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i`` alone, unpadded: the batch of one block with the batch dimension dropped."""
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        return {k: v[0] for k, v in self.batch([int(i) % len(self)]).items()}

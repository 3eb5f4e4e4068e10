"""Packed blocks: every block is ``seq_len + 1`` consecutive entries of one flat token tensor.

A block ``blk`` of width ``T + 1`` gives ``input_ids = blk[:-1]`` and ``labels = blk[1:]`` (already
shifted: ``labels[t]`` is the token after ``input_ids[:t+1]``), with ``-100`` wherever the next token
is not a target (padding, or a non-assistant token in chat data).

* **Text**: the token stream is cut with stride ``T``, so block ``i`` is ``stream[i*T : i*T + T + 1]``
  and neighbouring blocks share one token: every token but the first is a target exactly once.
  The tail shorter than a block is dropped.
* **Chat**: each conversation (truncated to ``T + 1`` tokens if longer) is placed whole into a block
  (best fit decreasing, :func:`best_fit`) and blocks are right-padded (``attention_mask`` 0, labels
  -100). Each conversation's positions restart at 0 (:func:`model_inputs`): it sees only itself.

The dataset never copies blocks: it holds the flat tensor and the block start offsets, so a split
is just a subset of offsets.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class BlockDataset(Dataset):
    """Blocks cut from one flat token tensor.

    Args:
        tokens: ``(N,)`` int32 token ids of the whole corpus.
        starts: ``(n,)`` int64 offset of each block in ``tokens``; block ``i`` is
            ``tokens[starts[i] : starts[i] + seq_len + 1]``.
        seq_len: ``T``, the length of ``input_ids``.
        targets: ``(N,)`` bool, False where a token must not be a label; ``None`` = all targets.
        real: ``(N,)`` bool, False on padding; ``None`` = no padding.
        teacher_rows: ``(N,)`` int64, for each token the row of a side table of teacher targets that
            describes it (-1 = none); ``None`` = no side table (see ``distillery.teachers.api_logprobs``).
        positions: ``(N,)`` int64, each token's position within its own document (0 where a packed
            conversation, or a block's padding, starts); ``None`` = plain text, positions ``0..T-1``.
        chat_from: the offset in ``tokens`` where the packed conversations begin (the plain-text stream comes
            first): blocks starting there or later are conversation blocks (``data.weights``); ``None`` = no
            conversations.

    ``dataset[i]`` is a dict ``input_ids (T,)``, ``labels (T,)``, ``attention_mask (T,)`` (int64) and
    ``index ()`` int64 = ``i``, the block's number within this dataset (the teacher cache's key); with
    ``teacher_rows`` also ``teacher_row (T,)``: the side-table row of each *label* position; with
    ``positions`` also ``position_ids (T,)``, which keeps packed conversations apart (:func:`model_inputs`).
    """

    def __init__(self, tokens: torch.Tensor, starts: torch.Tensor, seq_len: int,
                 targets: torch.Tensor | None = None, real: torch.Tensor | None = None,
                 teacher_rows: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 chat_from: int | None = None):
        self.tokens, self.starts, self.seq_len = tokens, starts.to(torch.int64), int(seq_len)
        self.targets, self.real, self.teacher_rows, self.positions = targets, real, teacher_rows, positions
        self.chat_from = chat_from
        self._offsets = torch.arange(self.seq_len + 1, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Blocks ``indices`` as a batch: ``input_ids, labels, attention_mask (B, T)``, ``index (B,)``."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        pos = self.starts[idx].unsqueeze(1) + self._offsets  # (B, T+1)
        blk = self.tokens[pos].to(torch.int64)
        labels = blk[:, 1:].clone()
        if self.targets is not None:
            labels[~self.targets[pos[:, 1:]]] = -100
        if self.real is not None:
            attention = self.real[pos[:, :-1]].to(torch.int64)
        else:
            attention = torch.ones_like(labels)
        out = {"input_ids": blk[:, :-1].contiguous(), "labels": labels, "attention_mask": attention, "index": idx}
        if self.teacher_rows is not None:
            out["teacher_row"] = self.teacher_rows[pos[:, 1:]]  # (B, T): the row describing labels[:, t]
        if self.positions is not None:
            out["position_ids"] = self.positions[pos[:, :-1]]  # (B, T): restarts at 0 where a conversation starts
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        i = int(i) % len(self)
        return {k: v[0] for k, v in self.batch([i]).items()}

    def subset(self, order: torch.Tensor) -> "BlockDataset":
        """A dataset of blocks ``order`` (in that order, renumbered 0..len-1), sharing storage."""
        return BlockDataset(self.tokens, self.starts[order], self.seq_len, self.targets, self.real, self.teacher_rows,
                            self.positions, self.chat_from)

    def chat_blocks(self) -> torch.Tensor:
        """``(n,)`` bool: which blocks hold packed conversations (the others are plain text)."""
        if self.chat_from is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.starts >= self.chat_from

    def n_targets(self) -> int:
        """Number of label positions that are not -100 (counts each block's own targets)."""
        if self.targets is None:
            return len(self) * self.seq_len
        pos = self.starts.unsqueeze(1) + self._offsets[1:]
        return int(self.targets[pos].sum())


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch: every ``(T,)`` becomes ``(B, T)``, ``index ()`` becomes ``(B,)``."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def model_inputs(batch: dict, device=None) -> dict:
    """Keyword arguments for a Hugging Face causal LM's forward on ``batch``.

    A batch of packed conversations carries ``position_ids (B, T)`` that restart at 0 where each conversation
    (and the block's padding) starts. They are passed *without* an attention mask: transformers then reads the
    restarts as packed sequences and builds a block-diagonal causal mask (``masking_utils.
    find_packed_sequence_indices``), so a token attends only to earlier tokens of its own conversation, and
    rotary positions count from each conversation's start. Padding sits at a block's end, where causality
    already hides it from every real token. Any other batch gets ``input_ids`` and ``attention_mask``, as before.
    """
    def on(x):
        return x if device is None else x.to(device)

    if batch.get("position_ids") is not None:
        # use_cache=False: transformers looks for packed sequences only when no KV cache is being built
        return {"input_ids": on(batch["input_ids"]), "position_ids": on(batch["position_ids"]), "use_cache": False}
    mask = batch.get("attention_mask")
    return {"input_ids": on(batch["input_ids"]), "attention_mask": None if mask is None else on(mask)}


def document_positions(lengths: list[int] | np.ndarray, total: int) -> np.ndarray:
    """``(total,)`` int64: ``0..len-1`` for each document of ``lengths`` in turn, then ``0..`` over the rest."""
    out = np.empty(total, dtype=np.int64)
    at = 0
    for n in [*lengths, total - int(np.sum(lengths))]:
        out[at:at + n] = np.arange(n)
        at += n
    return out


def text_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """``(n,)`` start offsets of the stride-``T`` blocks of a stream of ``n_tokens`` tokens."""
    n = max(0, (n_tokens - 1) // seq_len)
    return np.arange(n, dtype=np.int64) * seq_len


PACKING = "best fit decreasing"  # how pack_chat fills blocks (in the data fingerprint: another packing, other blocks)


def best_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Bin packing of items of ``lengths`` (each <= ``width``) into blocks of ``width``: best fit decreasing.

    Longest first (ties: earlier first), each into the open block with the least room that still holds it, else a
    new block. Returns the blocks in the order they were opened, each its item numbers in ascending order (a block
    holds its conversations in file order).
    Deterministic. Next fit in file order, used before, left a quarter of the demo's chat blocks' positions as
    padding (121 blocks); this packs the same conversations into 97, 5.5 % padding. Hand-written: a bucket per amount of room
    (``width + 1`` of them) makes it a few lines, and none of the dependencies packs bins.
    """
    by_room: list[list[int]] = [[] for _ in range(width + 1)]  # room left -> open blocks with exactly that room
    blocks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        need = lengths[i]
        room = next((r for r in range(need, width + 1) if by_room[r]), None)
        if room is None:
            blocks.append([i])
            b, left = len(blocks) - 1, width - need
        else:
            b = by_room[room].pop()
            blocks[b].append(i)
            left = room - need
        by_room[left].append(b)
    return [sorted(block) for block in blocks]


def pack_chat(convs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
              rows: list[list[int] | None] | None = None) -> dict:
    """Pack rendered conversations into padded blocks of ``T + 1`` tokens (:func:`best_fit`).

    Args:
        convs: ``(ids, assistant_mask)`` per conversation, in file order.
        rows: optional per-token side-table rows of each conversation (``None`` entries = all -1),
            packed, cut and dropped along with its tokens.
    Returns:
        dict with ``tokens (n*(T+1),)`` int32, ``targets`` / ``real`` ``(n*(T+1),)`` bool,
        ``starts (n,)`` int64, ``positions (n*(T+1),)`` int64 (each token's position in its conversation,
        padding counted as one more), and the counts ``truncated`` (conversations cut to ``T + 1`` tokens)
        and ``dropped`` (conversations with no assistant token left after the cut); with ``rows``
        also ``rows (n*(T+1),)`` int64 (-1 on padding and on tokens without a row).
    """
    width = seq_len + 1
    kept: list[tuple[list[int], list[int], list[int] | None]] = []
    truncated = dropped = 0
    for c, (ids, mask) in enumerate(convs):
        r = rows[c] if rows is not None else None
        if len(ids) > width:
            truncated += 1
            ids, mask, r = ids[:width], mask[:width], (None if r is None else r[:width])
        if not any(mask):  # the cut removed every assistant token: nothing to learn
            dropped += 1
            continue
        kept.append((ids, mask, r))
    blocks = [[kept[i] for i in members] for members in best_fit([len(ids) for ids, _, _ in kept], width)]
    n = len(blocks)
    tokens = np.full(n * width, pad_id, dtype=np.int32)
    targets = np.zeros(n * width, dtype=bool)
    real = np.zeros(n * width, dtype=bool)
    packed_rows = np.full(n * width, -1, dtype=np.int64) if rows is not None else None
    positions = np.zeros(n * width, dtype=np.int64)
    for b, members in enumerate(blocks):
        at = b * width
        positions[at:at + width] = document_positions([len(ids) for ids, _, _ in members], width)
        for ids, mask, r in members:
            tokens[at:at + len(ids)] = ids
            targets[at:at + len(ids)] = np.asarray(mask, dtype=bool)
            real[at:at + len(ids)] = True
            if r is not None:
                packed_rows[at:at + len(ids)] = r
            at += len(ids)
    out = {"tokens": tokens, "targets": targets, "real": real, "starts": np.arange(n, dtype=np.int64) * width,
           "positions": positions, "truncated": truncated, "dropped": dropped}
    if packed_rows is not None:
        out["rows"] = packed_rows
    return out

"""Tokenize text documents into one token stream: ``doc0 EOS doc1 EOS ... docN EOS``.

Speed: a long document is cut into pieces of about ``PIECE_CHARS`` characters and pieces are sent
to the tokenizer in batch calls (the fast tokenizer encodes a batch in parallel; many small pieces
are also quicker than one huge string). Cuts are made only between a non-space character and a
following ``" <letter>"``, a point where byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen,
SmolLM) split anyway, so the stream equals tokenizing each document in one call (tested). For
SentencePiece-style tokenizers that prepend "▁" to each input the first word of a piece may
tokenize differently; the result is still deterministic.

No BOS is added (``add_special_tokens=False``): packed blocks start mid-document anyway.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from ..errors import DistilleryError

PIECE_CHARS = 4096  # target piece length; measured fastest range on the 1 MB Shakespeare asset
CALL_CHARS = 1 << 18  # characters per tokenizer call (progress granularity)
_CUT = re.compile(r"(?<=\S)(?= [^\W\d_])")
_CUT_LOOKAHEAD = 4096  # if no safe cut within this many characters, cut hard


def split_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at least ``size`` characters (the last may be shorter)."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size, start + size + _CUT_LOOKAHEAD)
        cut = m.start() if m else start + size
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, no length warnings."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]


def tokenize_documents(texts: Iterable[str], tokenizer, progress: bool = True) -> np.ndarray:
    """``(N,)`` int32 stream of all documents, each followed by the tokenizer's EOS id.

    Empty documents are skipped (no lone EOS). The progress bar appears only when tokenizing
    takes longer than a second.
    """
    texts = [t for t in texts if t]
    if not texts:
        return np.zeros(0, dtype=np.int32)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DistilleryError("the tokenizer has no eos_token; text documents need it as a separator")
    total = sum(len(t) for t in texts)
    parts: list[np.ndarray] = []
    batch: list[str] = []
    ends: list[bool] = []  # ends[i]: piece i is the last of its document (EOS follows)
    size = 0
    with tqdm(total=total, desc="tokenize", unit="char", unit_scale=True, delay=1.0,
              disable=not progress, leave=False) as bar:
        def flush() -> None:
            nonlocal size
            ids = encode_batch(tokenizer, batch)
            seq = itertools.chain.from_iterable(
                (piece, [eos]) if last else (piece,) for piece, last in zip(ids, ends))
            parts.append(np.fromiter(itertools.chain.from_iterable(seq), dtype=np.int32))
            bar.update(size)
            batch.clear()
            ends.clear()
            size = 0

        for text in texts:
            pieces = split_pieces(text)
            for j, piece in enumerate(pieces):
                batch.append(piece)
                ends.append(j == len(pieces) - 1)
                size += len(piece)
                if size >= CALL_CHARS:
                    flush()
        if batch:
            flush()
    return np.concatenate(parts)

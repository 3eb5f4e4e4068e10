"""Exact-string vocabulary matching between two tokenizers: which teacher id and student id spell the same bytes.

Every token is reduced to the bytes it stands for in the text:

* **byte-level BPE** (GPT-2, Llama 3, Qwen, SmolLM): each character of the token string is one byte through GPT-2's
  ``bytes_to_unicode`` table, so ``"Ġthe"`` is ``b" the"`` and ``"ĠðŁĺ"`` the first three bytes of an emoji;
* **SentencePiece-style** (Metaspace / ``Replace(" ", "▁")``, Llama 2, Gemma, Mistral): the replacement character
  ``▁`` is a space and, with byte fallback, ``<0xE2>`` is the single byte 0xE2;
* **added tokens** that are not special: their content as UTF-8 (they are matched on raw text);
* **special tokens** (``<|im_end|>``, ``<|endoftext|>``, …): no bytes. They match only a special token of the other
  side with the same content (``match_special``), or through explicit ``pairs`` (e.g. each side's end of turn).

Two ids match when their bytes are equal. Within one vocabulary several ids can spell the same bytes (a byte-fallback
``<0x41>`` and the normal ``A``); the map is kept one-to-one so that the matched ids and the "rest" form a partition on
both sides (the tail-bucket losses need that): the id the tokenizer itself emits for those bytes wins — a normal token
over a byte-fallback token, then the lower id. The map is a sparse list of index pairs, built once per tokenizer pair
(well under a second for two 50k vocabularies) and cached in memory by the two tokenizers' hashes.
WordPiece (``##`` continuations) has no byte spelling per token and is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from ..data.build import tokenizer_hash
from ..errors import DistilleryError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


from ..api.targets import _byte_decoder  # GPT-2's byte table, one copy (the API teacher reads token bytes too)  # noqa: E402


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistilleryError(f"cross-tokenizer distillation needs fast tokenizers (character offsets); "
                              f"{type(tokenizer).__name__} is a slow one")
    return json.loads(backend.to_str())


def _uses(component: dict | None, kind: str) -> bool:
    """Whether a (possibly nested Sequence) normaliser/pre-tokeniser/decoder spec contains a ``kind`` step."""
    return component is not None and f'"type": "{kind}"' in json.dumps(component)


@dataclass(frozen=True)
class TokenBytes:
    """The byte spelling of every id of one tokenizer.

    Fields:
        spelling: ``spelling[id]`` = the bytes token ``id`` stands for, or ``None`` for a special token.
        special: special-token content -> id.
        byte_fallback: ids of ``<0xNN>`` byte-fallback tokens (a tokenizer emits them only for bytes it has no
            token for, so an equal-bytes normal token is preferred over them).
    """

    spelling: list[bytes | None]
    special: dict[str, int]
    byte_fallback: frozenset[int]

    def __len__(self) -> int:
        return len(self.spelling)


def token_bytes(tokenizer) -> TokenBytes:
    """Spell every id of a fast tokenizer as bytes (module docstring); special tokens get ``None``."""
    spec = _spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        raise DistilleryError("cross-tokenizer distillation does not support WordPiece tokenizers (their '##' pieces "
                              "have no byte spelling); use a BPE or Unigram tokenizer")
    byte_level = _uses(spec.get("pre_tokenizer"), "ByteLevel") or _uses(spec.get("decoder"), "ByteLevel")
    metaspace = re.search(r'"replacement": "(.)"', json.dumps(spec.get("pre_tokenizer"), ensure_ascii=False))
    marker = metaspace.group(1) if metaspace else "▁"
    fallback_ok = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()  # str -> id, added tokens included
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    size = max(max(vocab.values(), default=-1), max(added, default=-1)) + 1
    spelling: list[bytes | None] = [b""] * size
    special: dict[str, int] = {}
    fallback: set[int] = set()
    decoder = _byte_decoder()
    for text, i in vocab.items():
        if i in added:
            continue
        if byte_level and all(ch in decoder for ch in text):
            spelling[i] = bytes(decoder[ch] for ch in text)
            continue
        m = _BYTE_TOKEN.match(text) if fallback_ok else None
        if m:
            spelling[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        else:
            spelling[i] = text.replace(marker, " ").encode("utf-8")
    for i, tok in added.items():
        if tok.special:
            spelling[i] = None
            special[tok.content] = i
        else:
            spelling[i] = tok.content.encode("utf-8")
    return TokenBytes(spelling, special, frozenset(fallback))


@dataclass(frozen=True)
class VocabMap:
    """One-to-one pairs of teacher and student ids that spell the same bytes.

    Fields:
        teacher_ids: ``(M,)`` int64, ascending.
        student_ids: ``(M,)`` int64, ``student_ids[i]`` pairs with ``teacher_ids[i]``.
        teacher_vocab / student_vocab: the widths of the two id spaces (``V_t``, ``V_s``); ids beyond a model's real
            vocabulary (padded embedding rows) are never matched.
    """

    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    teacher_vocab: int
    student_vocab: int
    _lookups: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_matched(self) -> int:
        return int(self.teacher_ids.numel())

    @property
    def is_identity(self) -> bool:
        """Both vocabularies have the same width and every id matches itself."""
        return (self.teacher_vocab == self.student_vocab == self.n_matched
                and bool(torch.equal(self.teacher_ids, self.student_ids)))

    def t2s(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(V_t,)`` int64: the student id of each teacher id, ``-1`` where unmatched (cached per device)."""
        return self._lookup("t2s", device, self.teacher_ids, self.student_ids, self.teacher_vocab)

    def s2t(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(V_s,)`` int64: the teacher id of each student id, ``-1`` where unmatched (cached per device)."""
        return self._lookup("s2t", device, self.student_ids, self.teacher_ids, self.student_vocab)

    def _lookup(self, name, device, keys, values, width) -> torch.Tensor:
        key = (name, str(torch.device(device or "cpu")))
        if key not in self._lookups:
            table = torch.full((width,), -1, dtype=torch.int64)
            table[keys] = values
            self._lookups[key] = table.to(key[1])
        return self._lookups[key]

    def to(self, device: torch.device | str) -> "VocabMap":
        return VocabMap(self.teacher_ids.to(device), self.student_ids.to(device), self.teacher_vocab, self.student_vocab)


def _preferred(tb: TokenBytes) -> dict[bytes, int]:
    """bytes -> the id the tokenizer would emit for them (normal before byte-fallback, then the lowest id)."""
    out: dict[bytes, int] = {}
    for i, b in enumerate(tb.spelling):
        if not b:  # special (None) or an unused id (b"")
            continue
        j = out.get(b)
        if j is None or ((j in tb.byte_fallback) and (i not in tb.byte_fallback)):
            out[b] = i
    return out


def map_from_spellings(teacher: TokenBytes, student: TokenBytes, *, match_special: bool = True,
                       pairs: tuple[tuple[int, int], ...] = (), teacher_vocab: int | None = None,
                       student_vocab: int | None = None) -> VocabMap:
    """The exact-string map of two spelled vocabularies (see :func:`build_vocab_map`)."""
    vt = len(teacher) if teacher_vocab is None else int(teacher_vocab)
    vs = len(student) if student_vocab is None else int(student_vocab)
    s_of = _preferred(student)
    t2s = {t: s_of[b] for b, t in _preferred(teacher).items() if b in s_of}
    if match_special:
        t2s.update({t: student.special[c] for c, t in teacher.special.items() if c in student.special})
    for t, s in pairs:  # explicit pairs win over whatever either id was matched to
        if not (0 <= t < vt and 0 <= s < vs):
            raise DistilleryError(f"vocabulary pair ({t}, {s}) is outside the vocabularies ({vt}, {vs})")
        t2s = {a: b for a, b in t2s.items() if a != t and b != s}
        t2s[t] = s
    items = sorted((t, s) for t, s in t2s.items() if t < vt and s < vs)
    tids = torch.tensor([t for t, _ in items], dtype=torch.int64)
    sids = torch.tensor([s for _, s in items], dtype=torch.int64)
    return VocabMap(tids, sids, vt, vs)


_CACHE: dict[tuple, VocabMap] = {}


def build_vocab_map(teacher_tokenizer, student_tokenizer, *, match_special: bool = True,
                    pairs: tuple[tuple[int, int], ...] = (), teacher_vocab: int | None = None,
                    student_vocab: int | None = None) -> VocabMap:
    """Exact-string vocabulary map of a teacher and a student tokenizer, cached per pair.

    Args:
        match_special: pair special tokens with equal content (``<|im_end|>`` on both sides).
        pairs: explicit ``(teacher_id, student_id)`` pairs added last (e.g. the two ends of turn, or EOS ↔ EOS).
        teacher_vocab / student_vocab: the models' logit widths when they differ from the tokenizers' (padded
            embeddings); default: the tokenizers' sizes.
    """
    key = (tokenizer_hash(teacher_tokenizer), tokenizer_hash(student_tokenizer), match_special, tuple(pairs),
           teacher_vocab, student_vocab)
    if key not in _CACHE:
        _CACHE[key] = map_from_spellings(token_bytes(teacher_tokenizer), token_bytes(student_tokenizer),
                                         match_special=match_special, pairs=tuple(pairs),
                                         teacher_vocab=teacher_vocab, student_vocab=student_vocab)
    return _CACHE[key]

"""Tokenizers for the cross-tokenizer tests, built offline in milliseconds.

* :func:`hand_byte_level` / :func:`hand_metaspace`: hand-written BPE merges, so every split is known in advance:
  ``"Say hello world"`` is ``Say | Ġhello | Ġw or ld`` for the byte-level one and ``▁Say | ▁he l lo | ▁world`` for
  the SentencePiece-style one (Metaspace ``▁``, byte fallback ``<0xNN>``): a 1↔3 and a 3↔1 split.
* :func:`trained_metaspace`: a SentencePiece-style BPE with byte fallback trained on the bundled Shakespeare text
  (the byte-level counterpart is ``tiny.tiny_tokenizer``); different vocabulary sizes, different chat templates.
"""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distillery.xtok import align_text, build_vocab_map
from tiny import corpus_text, tiny_tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '</s>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
META_SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
SP_DECODER = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(" ", 1, 0)])


def _merge_vocab(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, int]:
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def hand_byte_level() -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 byte characters plus a few hand merges; ChatML template."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("S", "a"), ("Sa", "y"), ("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("Ġhel", "l"), ("Ġhell", "o"),
              ("Ġ", "w"), ("o", "r"), ("l", "d"), ("ð", "Ł"), ("ðŁ", "ĺ")]
    tok = Tokenizer(models.BPE(_merge_vocab(vocab, merges), merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def hand_metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: ``<0x00>..<0xFF>`` (byte fallback), ``▁``, ASCII letters and a few hand merges."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "S"), ("▁S", "a"), ("▁Sa", "y"), ("▁", "h"), ("▁h", "e"), ("l", "o"), ("▁", "w"), ("▁w", "o"),
              ("▁wo", "r"), ("▁wor", "l"), ("▁worl", "d")]
    tok = Tokenizer(models.BPE(_merge_vocab(vocab, merges), merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = SP_DECODER
    tok.add_special_tokens(META_SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ZEPHYR
    return fast


@functools.lru_cache(maxsize=4)
def _trained_metaspace(vocab_size: int, chars: int) -> str:
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    text = corpus_text(chars)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=META_SPECIAL, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # SentencePiece keeps the 256 byte tokens in its vocabulary for byte fallback
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = SP_DECODER
    return tok.to_str()


def trained_metaspace(vocab_size: int = 600, chars: int = 100_000) -> PreTrainedTokenizerFast:
    """A trained SentencePiece-style BPE (``vocab_size`` + 256 byte tokens) with the Zephyr-style template."""
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_metaspace(vocab_size, chars)),
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ZEPHYR
    return fast


def random_head_pair(text: str, teacher_hidden: int, student_hidden: int, teacher_scale: float, student_scale: float):
    """A byte-level teacher (1024) -> SentencePiece-style student (400 + bytes) pair on ``text``, with seeded random
    heads for the fused-loss tests: ``(alignment, vmap, t_ids, s_ids, h_t, w_t, hidden, w_s, b_s)`` — a lazy teacher
    (``h_t (1, T_t-1, teacher_hidden)``, ``w_t`` with 5 padded rows) and a student head with 3 padded rows and a bias."""
    t_tok, s_tok = tiny_tokenizer(1024), trained_metaspace(400)
    a = align_text(text, t_tok, s_tok)
    vmap = build_vocab_map(t_tok, s_tok)
    t_ids, s_ids = torch.tensor(a.teacher_ids)[None], torch.tensor(a.student_ids)[None]
    g = torch.Generator().manual_seed(0)
    h_t = torch.randn(1, t_ids.shape[1] - 1, teacher_hidden, generator=g)
    w_t = torch.randn(len(t_tok) + 5, teacher_hidden, generator=g) * teacher_scale
    hidden = torch.randn(1, s_ids.shape[1] - 1, student_hidden, generator=g)
    w_s = torch.randn(len(s_tok) + 3, student_hidden, generator=g) * student_scale
    b_s = torch.randn(len(s_tok) + 3, generator=g) * 0.3
    return a.alignment(), vmap, t_ids, s_ids, h_t, w_t, hidden, w_s, b_s

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

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tiny import corpus_text

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

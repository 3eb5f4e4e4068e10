"""Tokenizer → GGUF metadata for llama.cpp (byte-level BPE, the ``gpt2`` tokenizer model).

llama.cpp needs, besides the token list and merges, a *pre-tokenizer name* (``tokenizer.ggml.pre``)
that selects the regex it splits text with before BPE. llama.cpp's own converter recognises
tokenizers by hashing their output on a probe string and refuses unknown ones; we read the HF
tokenizer's ``pre_tokenizer`` instead and map its structure onto a name llama.cpp implements:

=====================================================================  ============
HF pre_tokenizer                                                        GGUF name
=====================================================================  ============
ByteLevel(use_regex=True) (GPT-2 regex; what ``tokenizers`` trains)     ``gpt-2``
Sequence[Digits(individual_digits), ByteLevel(use_regex=True)]          ``smollm``
Sequence[Split(Qwen2 regex, ``\\p{N}``), ByteLevel(use_regex=False)]   ``qwen2``
Sequence[Split(Llama-3 regex, ``\\p{N}{1,3}``), ByteLevel(False)]      ``llama-bpe``
=====================================================================  ============

Anything else falls back to ``gpt-2`` and is flagged (``pre_tokenizer_exact=False``); export
verification then compares llama.cpp's tokenization with HF's on sample texts.
"""

from __future__ import annotations

import json
import re

import gguf

from ..errors import DistilleryError

_HF_ONLY_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def _part(p: dict) -> str:
    kind = p.get("type")
    if kind == "ByteLevel":
        return "bytelevel_regex" if p.get("use_regex", True) else "bytelevel"
    if kind == "Digits":
        return "digits_single" if p.get("individual_digits") else "digits"
    if kind == "Split":
        pattern = (p.get("pattern") or {}).get("Regex") or ""
        if "\\p{N}{1,3}" in pattern:
            return "split_llama3"
        if "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in pattern:
            return "split_qwen2"
        return "split_other"
    return str(kind)


_KNOWN = {
    ("bytelevel_regex",): "gpt-2",
    ("digits_single", "bytelevel_regex"): "smollm",
    ("split_qwen2", "bytelevel"): "qwen2",
    ("split_llama3", "bytelevel"): "llama-bpe",
}


def pre_tokenizer_name(backend_json: dict) -> tuple[str, bool]:
    """(llama.cpp pre-tokenizer name, whether the mapping is exact) for a ``tokenizer.json`` dict."""
    pre = backend_json.get("pre_tokenizer") or {}
    parts = [pre] if pre.get("type") != "Sequence" else pre.get("pretokenizers", [])
    key = tuple(_part(p) for p in parts)
    name = _KNOWN.get(key)
    normalizer = (backend_json.get("normalizer") or {}).get("type")
    exact = name is not None and normalizer in (None, "NFC")
    return (name or "gpt-2"), exact


def gguf_chat_template(template: str | None) -> str | None:
    """The chat template without HF-only ``{% generation %}`` markers (they only drive HF's assistant
    mask and render nothing, but plain Jinja — llama.cpp's and llama-cpp-python's — rejects them)."""
    return None if template is None else _HF_ONLY_TAGS.sub("", template)


def _added_flags(tokenizer) -> dict[int, bool]:
    return {i: bool(t.special) for i, t in tokenizer.added_tokens_decoder.items()}


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Everything llama.cpp needs from ``tokenizer`` for a model with ``vocab_size`` logits.

    Ids the tokenizer does not use (a padded embedding) become ``[PAD<i>]`` tokens of type UNUSED.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistilleryError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; GGUF export needs one")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
        raise DistilleryError(f"tokenizer model {model.get('type')} is not byte-level BPE; GGUF export supports byte-level BPE only")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise DistilleryError(f"tokenizer has id {max(vocab.values())} but the model has only {vocab_size} logits")
    by_id = {i: t for t, i in vocab.items()}
    added = _added_flags(tokenizer)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre, exact = pre_tokenizer_name(spec)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    return {
        "tokens": tokens, "types": [int(t) for t in types], "merges": merges, "pre": pre, "pre_exact": exact,
        # llama.cpp defaults a BPE bos/eos to id 11 when unset: give it the eos (as GPT-2 does) instead
        "bos": bos if bos is not None else eos, "eos": eos,
        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id,
        "add_bos": bos is not None and len(probe) > 0 and probe[0] == bos,
        "add_eos": eos is not None and len(probe) > 1 and probe[-1] == eos,
        "chat_template": gguf_chat_template(getattr(tokenizer, "chat_template", None)),
    }


def add_tokenizer(writer: gguf.GGUFWriter, meta: dict) -> None:
    """Write :func:`tokenizer_metadata` output into a GGUF writer."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if meta[key] is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])

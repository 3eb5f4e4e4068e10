"""Stored top log-probabilities of a generated record -> sparse :class:`TeacherTargets`.

An API returns, for every generated token, its text (and UTF-8 ``bytes``) and the ``top_logprobs``
alternatives, never token ids. When the student uses the teacher's tokenizer, each token's bytes
name exactly one vocabulary entry, so the alternatives become ids and the record becomes the same
sparse top-k form the teacher cache stores: ``topk_ids (1, T, K)``, ``topk_logprobs (1, T, K)``,
``tail_logprob (1, T) = log(max(1 - sum_k exp(logprob_k), tiny))`` where ``T`` is the number of
generated tokens. Row ``t`` is the teacher's distribution of answer token ``t``; in a batch whose
``labels`` hold the answer at positions ``s .. s+T-1``, these rows go to those positions (use
:func:`answer_token_ids` to build the answer from the teacher's own tokens, so the two line up even
when re-tokenising the text would split it differently).

When the student's tokenizer is different, a generated token has no id in it: we raise
:class:`DistilleryError` saying that only the text can be used (sequence-level KD on the answers).

``K`` is the smallest number of distinct alternatives at any position (servers normally return
exactly ``top_logprobs``), so no row needs padding. Alternatives that map to the same id (two teacher
tokens with the same bytes) are merged with ``logaddexp``.

Temperature: OpenAI, vLLM (default ``logprobs_mode``) and llama.cpp report log-probabilities of the
model's unscaled distribution, whatever the sample temperature, hence ``loss_temperature=1.0``
(the llamacpp test tier checks this against llama.cpp).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import torch

from ..errors import DistilleryError
from ..targets import TeacherTargets, tail_logprob_outside


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (byte-level BPE writes byte b as a printable char)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    dec = json.loads(backend.to_str()).get("decoder") or {}
    return '"ByteLevel"' in json.dumps(dec)


def token_id_map(tokenizer) -> dict[bytes, int]:
    """``{token bytes: id}`` for every entry of a Hugging Face tokenizer (first id wins on a tie).

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) tokens are decoded through the byte table;
    SentencePiece tokens turn ``▁`` into a space and ``<0xNN>`` into byte NN; added/special tokens
    map from their text.
    """
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_level = _is_byte_level(tokenizer)
    table = _byte_decoder()
    out: dict[bytes, int] = {}
    specials: dict[bytes, int] = {}
    for i, tok in enumerate(toks):
        if tok is None:
            continue
        if byte_level and all(c in table for c in tok):
            b = bytes(table[c] for c in tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            b = bytes([int(tok[3:5], 16)])
        else:
            b = tok.replace("\u2581", " ").encode("utf-8")
        (specials if i in special else out).setdefault(b, i)
    for b, i in specials.items():  # a special token never shadows an ordinary one with the same text
        out.setdefault(b, i)
    return out


def _entry_bytes(entry: dict) -> bytes:
    b = entry.get("bytes")
    return bytes(b) if b is not None else entry["token"].encode("utf-8")


def _not_shared(record: dict, entry: dict) -> DistilleryError:
    return DistilleryError(
        f"record {record.get('id', '?')}: teacher token {entry['token']!r} has no id in the student's tokenizer, "
        "so the student does not share the teacher's tokenizer: only the text can be used "
        "(sequence-level KD on the answers; drop the sparse KD term)")


def _lost_bytes(entry: dict) -> bool:
    """A token whose text lost undecodable bytes (servers without ``bytes`` that split a character)."""
    return entry.get("bytes") is None and (entry["token"] == "" or "\ufffd" in entry["token"])


def _lost(record: dict) -> DistilleryError:
    return DistilleryError(
        f"record {record.get('id', '?')}: the server's token texts do not add up to the answer (it drops the bytes "
        "of tokens that split a multi-byte character and sends no 'bytes', as llama-cpp-python does), so token ids "
        "cannot be recovered exactly: use this record as text only")


def alternatives_row(entry: dict, id_map: dict[bytes, int]) -> tuple[list[tuple[float, int]], list[dict]]:
    """One generated token's ``top_logprobs`` -> ``([(logprob, id), ...] best first, alternatives with no id)``.

    Alternatives that map to the same id are merged with ``logaddexp``; those whose bytes the server lost
    are left out and not reported (the server's fault, not a sign of another tokenizer)."""
    merged: dict[int, float] = {}
    unmapped: list[dict] = []
    for alt in entry.get("top_logprobs") or []:
        if _lost_bytes(alt):
            continue
        i = id_map.get(_entry_bytes(alt))
        if i is None:
            unmapped.append(alt)
            continue
        lp = float(alt["logprob"])
        merged[i] = lp if i not in merged else float(torch.logaddexp(torch.tensor(merged[i]), torch.tensor(lp)))
    return sorted(((v, i) for i, v in merged.items()), reverse=True), unmapped


def answer_token_ids(record: dict, tokenizer, id_map: dict[bytes, int] | None = None) -> list[int]:
    """Ids of the teacher's own generated tokens (length ``T``), for lining targets up with labels.

    The tokens' bytes must add up to the answer text (or to a prefix of it, or it to a prefix of
    them when a stop sequence was cut off); otherwise the server lost bytes and this raises.
    """
    lps = record.get("logprobs")
    if not lps:
        raise DistilleryError(f"record {record.get('id', '?')}: no logprobs stored (generate with sampling.logprobs: true)")
    id_map = id_map if id_map is not None else token_id_map(tokenizer)
    joined = b"".join(_entry_bytes(e) for e in lps)
    answer = record["messages"][-1]["content"].encode("utf-8") if record.get("messages") else joined
    if any(_lost_bytes(e) for e in lps) or not (answer.startswith(joined) or joined.startswith(answer)):
        raise _lost(record)
    ids = []
    for e in lps:
        i = id_map.get(_entry_bytes(e))
        if i is None:
            raise _not_shared(record, e)
        ids.append(i)
    return ids


def api_targets(record: dict, tokenizer, *, id_map: dict[bytes, int] | None = None,
                loss_temperature: float = 1.0, strict: bool = True) -> TeacherTargets:
    """Sparse ``TeacherTargets`` ``(1, T, K)`` from one generated record's ``top_logprobs``.

    ``strict``: an alternative with no id in ``tokenizer`` is an error (a sign of another tokenizer);
    with ``strict=False`` it is left out and its mass falls into the tail (as is, always, an
    alternative whose text lost undecodable bytes). A *generated* token with
    no id is always an error. Pass ``id_map=token_id_map(tokenizer)`` when converting many records.
    """
    rid = record.get("id", "?")
    lps = record.get("logprobs")
    if not lps or not any(e.get("top_logprobs") for e in lps):
        raise DistilleryError(f"record {rid}: no top_logprobs stored (generate with sampling.logprobs: true "
                              "and sampling.top_logprobs > 0)")
    id_map = id_map if id_map is not None else token_id_map(tokenizer)
    answer_token_ids(record, tokenizer, id_map)  # every generated token must exist in the student's vocabulary
    rows: list[list[tuple[float, int]]] = []
    for t, e in enumerate(lps):
        row, unmapped = alternatives_row(e, id_map)
        if strict and unmapped:  # lost bytes are the server's fault and not counted there: not another tokenizer
            raise _not_shared(record, unmapped[0])
        if not row:
            raise DistilleryError(f"record {rid}: position {t} has no usable top_logprobs")
        rows.append(row)
    k = min(len(r) for r in rows)
    ids = torch.tensor([[i for _, i in r[:k]] for r in rows], dtype=torch.long).unsqueeze(0)  # (1, T, K)
    lp = torch.tensor([[v for v, _ in r[:k]] for r in rows], dtype=torch.float32).unsqueeze(0)  # (1, T, K)
    tail = tail_logprob_outside(lp)  # (1, T)
    mask = torch.ones(1, len(rows), dtype=torch.bool)
    if not math.isfinite(loss_temperature) or loss_temperature <= 0:
        raise DistilleryError(f"loss_temperature must be > 0 (got {loss_temperature})")
    return TeacherTargets(topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, loss_temperature=loss_temperature,
                          mask=mask, vocab_size=len(tokenizer))

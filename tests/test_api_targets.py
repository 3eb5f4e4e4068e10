"""api_targets: stored top log-probabilities -> sparse TeacherTargets (tiny offline BPE tokenizer)."""

from __future__ import annotations

import pytest
import torch

from distillery.api import api_targets, token_id_map
from distillery.api.targets import answer_token_ids
from distillery.errors import DistilleryError
from distillery.targets import sparse_from_logits
from tiny import tiny_tokenizer


def _entry(tok, i: int, lp: float) -> dict:
    """What an OpenAI-compatible server reports for token id ``i``: its text and UTF-8 bytes."""
    b = tok.decode([i]).encode("utf-8")
    return {"token": b.decode("utf-8", "replace"), "bytes": list(b), "logprob": lp}


def record_from_sparse(tok, sampled: list[int], ids: torch.Tensor, lps: torch.Tensor) -> dict:
    """A generated record as the API returns it, built from known ids ``(T, K)`` and logprobs ``(T, K)``."""
    content = []
    for t, s in enumerate(sampled):
        e = _entry(tok, s, float(lps[t, 0]))
        e["top_logprobs"] = [_entry(tok, int(i), float(v)) for i, v in zip(ids[t], lps[t])]
        content.append(e)
    return {"id": "r1", "messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": tok.decode(sampled)}], "logprobs": content}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def clean_ids(tok) -> list[int]:
    """Ids whose text is whole UTF-8 characters (decode() shows the others as U+FFFD)."""
    return [i for i in range(len(tok)) if "\ufffd" not in tok.decode([i])]


def test_token_id_map_covers_the_vocabulary(tok):
    m = token_id_map(tok)
    assert len(set(m.values())) == len(tok)  # every id reachable: byte strings are unique
    for i in clean_ids(tok)[::37]:
        assert m[tok.decode([i]).encode("utf-8")] == i
    # A lone byte of a multi-byte character (what `bytes` carries for partial tokens): byte-level
    # BPE spells byte 0xC3 as the character U+00C3.
    assert m[b"\xc3"] == tok.convert_tokens_to_ids("\u00c3")


def test_api_targets_equals_sparse_from_logits(tok):
    """Parity: logits -> top-k (reference path) == logits -> API record -> api_targets (API path)."""
    torch.manual_seed(0)
    V, T, K = len(tok), 6, 5
    logits = torch.full((1, T, V), -1e4)
    clean = torch.tensor(clean_ids(tok))
    logits[..., clean] = torch.randn(1, T, len(clean)) * 3  # partial-character ids: never in the top-k
    ref = sparse_from_logits(logits, K, loss_temperature=1.0, vocab_size=V)
    sampled = ref.topk_ids[0, :, 0].tolist()
    rec = record_from_sparse(tok, sampled, ref.topk_ids[0], ref.topk_logprobs[0])
    got = api_targets(rec, tok)
    assert torch.equal(got.topk_ids, ref.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, ref.topk_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.tail_logprob, ref.tail_logprob, atol=1e-5, rtol=0)
    assert got.loss_temperature == 1.0 and got.vocab_size == V and got.mask.all()
    assert answer_token_ids(rec, tok) == sampled


def test_uneven_top_lists_are_cut_to_the_shortest_and_duplicates_merged(tok):
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    lps = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.05], [0.5, 0.3, 0.1, 0.05]]))
    rec = record_from_sparse(tok, [10, 20], ids, lps)
    rec["logprobs"][0]["top_logprobs"].pop()  # a server may send fewer than asked at some positions
    rec["logprobs"][1]["top_logprobs"].append(dict(rec["logprobs"][1]["top_logprobs"][2]))  # same token twice
    got = api_targets(rec, tok)
    assert got.topk_ids.shape == (1, 2, 3)
    assert got.topk_ids[0, 1].tolist() == [20, 21, 22]
    torch.testing.assert_close(got.topk_logprobs[0, 1].exp(), torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(got.tail_logprob.exp(), torch.tensor([[0.3, 0.0]]), atol=1e-6, rtol=0)


def test_other_tokenizer_is_refused_with_a_clear_message(tok):
    small = tiny_tokenizer(vocab_size=300)
    small_bytes = set(token_id_map(small))
    big_only = next(i for i in range(len(tok) - 1, 0, -1) if tok.decode([i]).encode() not in small_bytes)
    ids = torch.tensor([[big_only, 5]])
    lps = torch.log(torch.tensor([[0.6, 0.3]]))
    rec = record_from_sparse(tok, [big_only], ids, lps)
    with pytest.raises(DistilleryError, match="does not share the teacher's tokenizer: only the text can be used"):
        api_targets(rec, small)
    # An alternative unknown to the student: strict refuses, lenient moves its mass into the tail.
    rec2 = record_from_sparse(tok, [5], torch.tensor([[5, big_only]]), torch.log(torch.tensor([[0.6, 0.3]])))
    with pytest.raises(DistilleryError, match="does not share"):
        api_targets(rec2, small)
    got = api_targets(rec2, small, strict=False)
    assert got.topk_ids.tolist() == [[[token_id_map(small)[tok.decode([5]).encode()]]]]
    torch.testing.assert_close(got.tail_logprob.exp(), torch.tensor([[0.4]]))


def test_records_without_top_logprobs_are_refused(tok):
    with pytest.raises(DistilleryError, match="no top_logprobs stored"):
        api_targets({"id": "x", "messages": []}, tok)


def test_tokens_that_lost_bytes_are_reported_as_such(tok):
    """llama-cpp-python sends bytes: null and drops undecodable bytes of a token that splits a character."""
    e_acute = [tok.convert_tokens_to_ids(c) for c in ("\u00c3", "\u00a9")]  # byte-level spelling of b"\xc3", b"\xa9"
    rec = {"id": "r", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\u00e9"}],
           "logprobs": [{"token": "", "bytes": None, "logprob": -0.1, "top_logprobs": [{"token": "", "bytes": None, "logprob": -0.1}]},
                        {"token": "", "bytes": None, "logprob": -0.1, "top_logprobs": [{"token": "", "bytes": None, "logprob": -0.1}]}]}
    with pytest.raises(DistilleryError, match="do not add up to the answer"):
        api_targets(rec, tok)
    for e, b in zip(rec["logprobs"], (0xC3, 0xA9)):  # with bytes (OpenAI, vLLM) the ids come back exactly
        e["bytes"] = [b]
        e["top_logprobs"] = [dict(e), {"token": "", "bytes": None, "logprob": -3.0}]  # a lost alternative: dropped
    assert answer_token_ids(rec, tok) == e_acute
    assert api_targets(rec, tok).topk_ids[0, :, 0].tolist() == e_acute

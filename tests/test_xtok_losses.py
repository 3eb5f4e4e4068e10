"""Cross-tokenizer losses: hand values, the same-vocabulary identity, sparse/cached == live, chunking parity, spans."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import LossInputError, forward_kl
from distillery.targets import TeacherTargets, sparse_from_logits
from distillery.xtok import (ONE, StudentHead, align_text, build_vocab_map, cached_to_student, map_from_spellings,
                             student_side_loss, student_side_targets, token_bytes, xtok_loss)
from distillery.xtok import terms
from tiny import corpus_text, tiny_llama, tiny_tokenizer
from xtok_tokenizers import hand_byte_level, hand_metaspace, trained_metaspace


def test_matched_kl_uld_gold_span_hand_values():
    # teacher V_t = 3, ids 0, 1 match student ids 1, 0; teacher id 2 and student id 2 are unmatched
    lp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    lq = torch.tensor([[0.25, 0.25, 0.5]]).log()
    t_ids, s_ids = torch.tensor([0, 1]), torch.tensor([1, 0])
    rest = lp[:, 2]
    kl = terms.matched_kl(lq, s_ids, lp[:, t_ids], rest)
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5), abs=1e-6)
    # per-row ids with a -1 (an unmatched top-k entry already folded into the rest)
    kl_rows = terms.matched_kl(lq, torch.tensor([[1, -1, 0]]), torch.tensor([[0.5, 0.1, 0.3]]).log(),
                               torch.tensor([0.1]).log())
    assert kl_rows.item() == pytest.approx(0.5 * math.log(2) + 0.3 * math.log(0.3 / 0.25) + 0.1 * math.log(0.1 / 0.5),
                                           abs=1e-6)
    # ULD: sorted [.5 .3 .2] vs [.5 .25 .25]; and against a 2-entry student (zero-padded)
    assert terms.uld(lp, lq).item() == pytest.approx(0.1, abs=1e-6)
    assert terms.uld(lp, torch.tensor([[0.9, 0.1]]).log()).item() == pytest.approx(0.4 + 0.2 + 0.2, abs=1e-6)
    # GOLD: w_m = 2/3 (M / V_t), JSD(0.5) on the unnormalised matched probs, L1 on sorted unmatched (.2 vs .5)
    a, b = torch.tensor([0.5, 0.3]), torch.tensor([0.25, 0.25])
    m = 0.5 * a + 0.5 * b
    jsd = float(0.5 * (a * (a / m).log()).sum() + 0.5 * (b * (b / m).log()).sum())
    assert terms.gold_hybrid(lp, lq, t_ids, s_ids, beta=0.5).item() == pytest.approx(2 / 3 * jsd + 1 / 3 * 0.3, abs=1e-6)
    assert terms.gold_jsd(a[None], b[None], 0.0).item() == pytest.approx((a * (a / b).log()).sum().item(), abs=1e-6)
    assert terms.gold_hybrid(lp, lq, t_ids, s_ids, beta=0.5, weights=(1.0, 0.0)).item() == pytest.approx(jsd, abs=1e-6)
    # span Bernoulli KL: teacher span prob .5, student .25
    got = terms.span_binary_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert got.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    assert terms.span_binary_kl(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(0.0, abs=1e-6)


def _same_vocab_batch(seed=0, t=40):
    tok = tiny_tokenizer(512)
    text = corpus_text(6000)[2000:2400]
    a = align_text(text, tok, tok)
    ids = torch.tensor(a.student_ids[: t + 1])[None]
    student, teacher = tiny_llama(512, seed=seed), tiny_llama(512, seed=seed + 1)
    with torch.no_grad():
        t_out = teacher(ids[:, :-1], output_hidden_states=True)
    s_logits = student(ids[:, :-1]).logits.detach().requires_grad_(True)
    from distillery.xtok import align_spans, block_alignment
    al = block_alignment(align_spans(a.teacher_offsets[: t + 1], a.student_offsets[: t + 1]), t, t)
    return tok, ids, s_logits, t_out, teacher, al


def test_identical_tokenizers_equal_forward_kl_dense_lazy_and_chunked():
    tok, ids, s_logits, t_out, teacher, al = _same_vocab_batch()
    vmap = build_vocab_map(tok, tok)
    labels = ids[:, 1:]
    assert (al.kind == ONE).all()
    ref = forward_kl(s_logits, t_out.logits, loss_temperature=2.0)
    (g_ref,) = torch.autograd.grad(ref.sum(), s_logits)
    for target, chunk, ckpt in [(TeacherTargets(logits=t_out.logits), 1000, False),
                                (TeacherTargets(hidden=t_out.hidden_states[-1], lm_head_weight=teacher.lm_head.weight), 7, True)]:
        got = xtok_loss(s_logits, target, al, vmap, student_labels=labels, loss_temperature=2.0, chunk_size=chunk,
                        checkpoint=ckpt)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        (g,) = torch.autograd.grad(got.sum(), s_logits)
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)


def test_student_head_lazy_equals_materialised_logits():
    tok, ids, _, t_out, _, al = _same_vocab_batch(t=24)
    vmap = build_vocab_map(tok, tok)
    student = tiny_llama(512, seed=3)
    hidden = student.model(ids[:, :-1]).last_hidden_state.detach().requires_grad_(True)
    w = student.lm_head.weight
    target = TeacherTargets(logits=t_out.logits)
    lazy = xtok_loss(StudentHead(hidden, w), target, al, vmap, student_labels=ids[:, 1:], chunk_size=5)
    full = xtok_loss(hidden @ w.t(), target, al, vmap, student_labels=ids[:, 1:], chunk_size=5)
    torch.testing.assert_close(lazy, full, atol=1e-6, rtol=0)
    g_lazy = torch.autograd.grad(lazy.sum(), (hidden, w))
    g_full = torch.autograd.grad(full.sum(), (hidden, w))
    for a, b in zip(g_lazy, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def cross_pair():
    """A byte-level teacher (1024) and a SentencePiece-style student (400 + 256 bytes) on the same text: 1-1, 1-n
    and n-1 spans all occur (120 / 30 / 8 student positions)."""
    t_tok, s_tok = tiny_tokenizer(1024), trained_metaspace(400)
    text = corpus_text(20_000)[10_000:10_400] + " 😀 naïve"
    a = align_text(text, t_tok, s_tok)
    vmap = build_vocab_map(t_tok, s_tok)
    t_ids, s_ids = torch.tensor(a.teacher_ids)[None], torch.tensor(a.student_ids)[None]
    torch.manual_seed(0)
    t_logits = torch.randn(1, t_ids.shape[1] - 1, len(t_tok)) * 3
    s_logits = (torch.randn(1, s_ids.shape[1] - 1, len(s_tok)) * 3).requires_grad_(True)
    return t_tok, s_tok, a, vmap, t_ids, s_ids, t_logits, s_logits


def test_cross_pair_sparse_full_k_equals_dense_and_cache_is_a_lower_bound(cross_pair):
    t_tok, s_tok, a, vmap, t_ids, s_ids, t_logits, s_logits = cross_pair
    al = a.alignment()
    counts = al.counts()
    assert counts["1-1"] > 0 and counts["end"] > 0 and counts["1-m"] > 0
    kw = dict(student_labels=s_ids[:, 1:], teacher_labels=t_ids[:, 1:])
    live = xtok_loss(s_logits, TeacherTargets(logits=t_logits), al, vmap, **kw)
    full_k = xtok_loss(s_logits, sparse_from_logits(t_logits, len(t_tok), 1.0), al, vmap, **kw)
    torch.testing.assert_close(full_k, live, atol=1e-5, rtol=0)
    sparse = sparse_from_logits(t_logits, 16, 1.0)
    cached = xtok_loss(s_logits, sparse, al, vmap, **kw)
    one = al.kind == ONE
    # coarse-graining the teacher to its top-16 + a tail bucket can only lower a forward KL (data processing)
    assert (cached[one] <= live[one] + 1e-5).all() and (cached[one] < live[one] - 1e-3).any()
    assert cached[~one].abs().sum() > 0  # span terms at END / 1-m positions, from top-k label log-probs or bounds
    # the cache path: teacher top-k + both sides' byte offsets -> student-side targets -> the same per-token loss
    sst = cached_to_student(sparse.topk_ids[0], sparse.topk_logprobs[0], sparse.tail_logprob[0], a.teacher_offsets,
                            a.student_offsets, vmap, 1.0, teacher_labels=t_ids[0, 1:])
    assert torch.equal(sst.alignment.kind, al.kind)
    via_cache = student_side_loss(s_logits, sst, student_labels=s_ids[:, 1:], vocab_size=len(s_tok), chunk_size=9)
    torch.testing.assert_close(via_cache, cached, atol=1e-6, rtol=0)
    g1 = torch.autograd.grad(via_cache.sum(), s_logits)[0]
    g2 = torch.autograd.grad(cached.sum(), s_logits)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def test_span_terms_by_hand():
    t_tok, s_tok = hand_byte_level(), hand_metaspace()
    a = align_text("Say hello world", t_tok, s_tok)  # Say | Ġhello | Ġw or ld  vs  ▁Say | ▁he l lo | ▁world
    al, vmap = a.alignment(), build_vocab_map(t_tok, s_tok)
    torch.manual_seed(1)
    t_logits = torch.randn(1, 4, len(t_tok))
    s_logits = torch.randn(1, 4, len(s_tok), requires_grad=True)
    t_lab, s_lab = torch.tensor(a.teacher_ids[1:])[None], torch.tensor(a.student_ids[1:])[None]
    got = xtok_loss(s_logits, TeacherTargets(logits=t_logits), al, vmap, student_labels=s_lab, teacher_labels=t_lab)
    lp = torch.log_softmax(t_logits[0], -1).gather(-1, t_lab[0, :, None])[:, 0]  # teacher label log-probs (4,)
    lq = torch.log_softmax(s_logits[0], -1).gather(-1, s_lab[0, :, None])[:, 0]
    # "▁he l lo" (student 0..2) vs "Ġhello" (teacher 0); "▁world" (student 3) vs "Ġw or ld" (teacher 1..3)
    want = torch.stack([torch.tensor(0.0), torch.tensor(0.0), terms.span_binary_kl(lp[0], lq[:3].sum()),
                        terms.span_binary_kl(lp[1:].sum(), lq[3])])
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(got.sum(), s_logits)
    assert g[0, 0].abs().sum() > 0  # the START position learns through the END term
    half = xtok_loss(s_logits, TeacherTargets(logits=t_logits), al, vmap, student_labels=s_lab,
                     teacher_label_logprob=lp[None], span_weight=0.5)
    torch.testing.assert_close(half, 0.5 * got, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["uld", "gold"])
def test_uld_and_gold_rows_match_the_terms(cross_pair, method):
    t_tok, s_tok, a, vmap, t_ids, s_ids, t_logits, s_logits = cross_pair
    al = a.alignment()
    got = xtok_loss(s_logits, TeacherTargets(logits=t_logits), al, vmap, method=method, span_weight=0.0,
                    student_labels=s_ids[:, 1:], chunk_size=11)
    one = (al.kind[0] == ONE).nonzero().squeeze(-1)
    lp = torch.log_softmax(t_logits[0, al.teacher_first[0, one]], -1)
    lq = torch.log_softmax(s_logits[0, one], -1)
    want = terms.uld(lp, lq) if method == "uld" else terms.gold_hybrid(lp, lq, vmap.teacher_ids, vmap.student_ids)
    torch.testing.assert_close(got[0, one], want, atol=1e-5, rtol=0)
    assert got[0][al.kind[0] != ONE].abs().sum() == 0
    # a sparse row is completed with its tail spread evenly; with K = V it is the dense row
    full_k = xtok_loss(s_logits, sparse_from_logits(t_logits, len(t_tok), 1.0), al, vmap, method=method,
                       span_weight=0.0, student_labels=s_ids[:, 1:])
    torch.testing.assert_close(full_k, got, atol=1e-5, rtol=0)


def test_student_side_targets_map_topk_ids():
    t_tok, s_tok = hand_byte_level(), hand_metaspace()
    vmap = map_from_spellings(token_bytes(t_tok), token_bytes(s_tok))
    a = align_text("Say 😀é", t_tok, s_tok)  # 1-1 spans from "Ġ" on, one 1-3 span
    al = a.alignment()
    w, o = t_tok.convert_tokens_to_ids("Ġw"), t_tok.convert_tokens_to_ids("Ġhello")  # matched, unmatched
    ids = torch.tensor([[w, o]] * al.teacher_len)
    lp = torch.tensor([[0.5, 0.3]] * al.teacher_len).log()
    teacher = TeacherTargets(topk_ids=ids[None], topk_logprobs=lp[None], tail_logprob=torch.full((1, al.teacher_len),
                             math.log(0.2)), loss_temperature=1.0)
    sst = student_side_targets(teacher, al, vmap, teacher_label_logprob=torch.full((1, al.teacher_len), -1.0))
    first_one = int((al.kind[0] == ONE).nonzero()[0])
    assert sst.ids[0, first_one].tolist() == [s_tok.convert_tokens_to_ids("▁w"), -1]
    assert sst.rest_logprob[0, first_one].item() == pytest.approx(math.log(0.5), abs=1e-6)  # .3 unmatched + .2 tail
    end = int((al.kind[0] == 4).nonzero()[0])
    assert sst.span_logprob[0, end].item() == pytest.approx(-1.0)  # the 1-3 span covers one teacher token
    assert sst.ids[0, end].tolist() == [-1, -1]


def test_bad_inputs_are_one_line_errors(cross_pair):
    t_tok, s_tok, a, vmap, t_ids, s_ids, t_logits, s_logits = cross_pair
    al = a.alignment()
    with pytest.raises(LossInputError, match="unknown cross-tokenizer method"):
        xtok_loss(s_logits, TeacherTargets(logits=t_logits), al, vmap, method="kl", student_labels=s_ids[:, 1:])
    with pytest.raises(LossInputError, match="teacher_labels"):
        xtok_loss(s_logits, TeacherTargets(logits=t_logits), al, vmap, student_labels=s_ids[:, 1:])
    with pytest.raises(LossInputError, match="do not match"):
        xtok_loss(s_logits[:, :-1], TeacherTargets(logits=t_logits), al, vmap, student_labels=s_ids[:, 1:])
    with pytest.raises(LossInputError, match="loss_temperature"):
        xtok_loss(s_logits, sparse_from_logits(t_logits, 8, 1.0), al, vmap, student_labels=s_ids[:, 1:],
                  teacher_labels=t_ids[:, 1:], loss_temperature=2.0)

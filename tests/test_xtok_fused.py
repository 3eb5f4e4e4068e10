"""The fused cross-tokenizer rows (xtok.fused) against the reference path (autograd per chunk): values and gradients
for every method and teacher form, temperatures, a biased head with padded rows, uneven row weights, no-grad use."""

from __future__ import annotations

import pytest
import torch

from distillery.targets import TeacherTargets, sparse_from_logits
from distillery.xtok import StudentHead, xtok_loss
from distillery.xtok.fused import matched_first
from tiny import corpus_text
from xtok_tokenizers import random_head_pair


@pytest.fixture(scope="module")
def pair():
    """Byte-level teacher (1024) -> SentencePiece-style student (400 + bytes): 1-1, 1-n and n-1 spans; a student
    head with 3 padded rows and a bias, a lazy teacher (hidden + head)."""
    return random_head_pair(corpus_text(20_000)[10_000:10_500] + " 😀 naïve", 24, 16, 0.4, 0.5)


def _grads(pair, teacher, method, tau, fused, weights=None, chunk=7):
    al, vmap, t_ids, s_ids, *_, hidden, w_s, b_s = pair
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, w_s, b_s))
    got = xtok_loss(StudentHead(h, w, b), teacher, al, vmap, student_labels=s_ids[:, 1:], teacher_labels=t_ids[:, 1:],
                    method=method, loss_temperature=tau, chunk_size=chunk, fused=fused)
    total = got.sum() * 0.37 if weights is None else (got * weights).sum()
    return got.detach(), torch.autograd.grad(total, (h, w, b))


@pytest.mark.parametrize("method,form,tau", [("exact_kl", "lazy", 1.0), ("exact_kl", "logits", 2.0),
                                             ("exact_kl", "sparse", 1.0), ("uld", "lazy", 1.0), ("gold", "logits", 2.0)])
def test_fused_equals_reference(pair, method, form, tau):
    al, vmap, t_ids, s_ids, h_t, w_t, *_ = pair
    v_t = vmap.teacher_vocab
    logits = h_t @ w_t[:v_t].t()
    teacher = {"lazy": TeacherTargets(hidden=h_t, lm_head_weight=w_t, vocab_size=v_t),
               "logits": TeacherTargets(logits=logits),
               "sparse": sparse_from_logits(logits, 32, tau)}[form]
    ref, g_ref = _grads(pair, teacher, method, tau, fused=False)
    got, g_got = _grads(pair, teacher, method, tau, fused=True)
    assert ref.abs().sum() > 1.0  # a real loss, spans included
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    assert g_got[1][vmap.student_vocab:].abs().sum() == 0  # padded head rows learn nothing
    # uneven weights per position (the backward recomputes) and no-grad use give the same numbers
    weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1))
    _, g_ref_w = _grads(pair, teacher, method, tau, fused=False, weights=weights)
    _, g_got_w = _grads(pair, teacher, method, tau, fused=True, weights=weights)
    for a, b in zip(g_got_w, g_ref_w):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    with torch.no_grad():
        nog = xtok_loss(StudentHead(pair[6], pair[7], pair[8]), teacher, al, vmap, student_labels=s_ids[:, 1:],
                        teacher_labels=t_ids[:, 1:], method=method, loss_temperature=tau, chunk_size=5)
    torch.testing.assert_close(nog, got, atol=2e-5, rtol=1e-5)


def test_matched_first_layout():
    perm = matched_first(torch.tensor([4, 1, 6]), 8)
    assert perm.tolist() == [4, 1, 6, 0, 2, 3, 5, 7]



def test_student_side_loss_fused_equals_reference(pair):
    from distillery.xtok import student_side_loss, student_side_targets

    al, vmap, t_ids, s_ids, h_t, w_t, hidden, w_s, b_s = pair
    sparse = sparse_from_logits(h_t @ w_t[:vmap.teacher_vocab].t(), 16, 1.0)
    sst = student_side_targets(sparse, al, vmap, teacher_labels=t_ids[:, 1:])
    out = []
    for fused in (False, True):
        h, w, b = (x.clone().requires_grad_(True) for x in (hidden, w_s, b_s))
        got = student_side_loss(StudentHead(h, w, b), sst, student_labels=s_ids[:, 1:], vocab_size=vmap.student_vocab,
                                chunk_size=6, fused=fused)
        out.append((got.detach(), torch.autograd.grad(got.sum(), (h, w, b))))
    assert out[0][0].abs().sum() > 1.0
    torch.testing.assert_close(out[1][0], out[0][0], atol=2e-5, rtol=1e-5)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)

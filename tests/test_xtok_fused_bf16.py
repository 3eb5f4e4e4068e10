"""The fused heads' bf16 matmuls under autocast (xtok.fused, losses.chunked): within bf16 rounding of the fp32 path.

Under ``torch.autocast(dtype=bfloat16)`` the head matmuls of the fused cross-tokenizer rows and of the chunked CE/KD
loss take bf16 operands (fp32 accumulation); the softmax, the loss and ``dz`` stay fp32. The tolerances below are
stated for operands and ``dz`` rounded to bf16 (relative 2⁻⁸ per element): the summed loss within 1e-2 relative
of the fp32 path (measured here: <= 5e-4) and, for exact_kl and the CE/KD chunked loss, every gradient within 3e-2
in relative Frobenius norm (measured: <= 9e-3; ULD/GOLD: see the test); fp64 inputs ignore autocast and stay
bit-identical; fp16 autocast keeps fp32 heads.
"""

from __future__ import annotations

import pytest
import torch

from distillery.losses import chunked, chunked_distill_loss
from distillery.losses.chunked import autocast_head_dtype
from distillery.targets import TeacherTargets, sparse_from_logits
from distillery.xtok import StudentHead, xtok_loss
from tiny import corpus_text
from xtok_tokenizers import random_head_pair

LOSS_RTOL, GRAD_RTOL = 1e-2, 3e-2


@pytest.fixture(scope="module")
def pair():
    """Byte-level teacher (1024) -> SentencePiece-style student (400 + bytes): 1-1, 1-n and n-1 spans; a student
    head with 3 padded rows and a bias (hidden size 64: each logit sums 64 bf16 products), a lazy teacher."""
    return random_head_pair(corpus_text(20_000)[10_000:10_800], 48, 64, 0.3, 0.3)


def _teacher(pair, form, tau, dtype=torch.float32):
    vmap, h_t, w_t = pair[1], pair[4].to(dtype), pair[5].to(dtype)
    v_t = vmap.teacher_vocab
    logits = h_t @ w_t[:v_t].t()
    return {"lazy": TeacherTargets(hidden=h_t, lm_head_weight=w_t, vocab_size=v_t),
            "logits": TeacherTargets(logits=logits), "sparse": sparse_from_logits(logits, 32, tau)}[form]


def _xtok(pair, teacher, method, tau, bf16, dtype=torch.float32, weights=None):
    al, vmap, t_ids, s_ids, *_, hidden, w_s, b_s = pair
    h, w, b = (x.to(dtype).clone().requires_grad_(True) for x in (hidden, w_s, b_s))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = xtok_loss(StudentHead(h, w, b), teacher, al, vmap, student_labels=s_ids[:, 1:],
                        teacher_labels=t_ids[:, 1:], method=method, loss_temperature=tau, chunk_size=16)
        total = got.sum() if weights is None else (got * weights).sum()
    return got.detach(), torch.autograd.grad(total, (h, w, b))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_autocast_head_dtype():
    assert autocast_head_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_head_dtype("cpu") == torch.bfloat16
        assert autocast_head_dtype(torch.device("cpu")) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert autocast_head_dtype("cpu") is None  # fp16: the heads stay fp32 (module docstring)


def _perturbed_grad_error(pair, teacher, method, tau, g_ref) -> list[float]:
    """Relative gradient change of the fp32 path when the student's hidden states and head get random relative
    perturbations of 2⁻⁸ (bf16's unit roundoff), mean of two draws: the gradient's own sensitivity to rounding."""
    errs = []
    for seed in (5, 6):
        g = torch.Generator().manual_seed(seed)
        p2 = list(pair)
        for i in (6, 7):
            p2[i] = pair[i] * (1 + 2 ** -8 * torch.randn(pair[i].shape, generator=g))
        errs.append([_rel(a, b) for a, b in zip(_xtok(p2, teacher, method, tau, bf16=False)[1], g_ref)])
    return [sum(e) / len(errs) for e in zip(*errs)]


@pytest.mark.parametrize("method,form,tau,uneven", [("exact_kl", "lazy", 1.0, False), ("exact_kl", "logits", 2.0, True),
                                                    ("exact_kl", "sparse", 1.0, False), ("uld", "lazy", 1.0, False),
                                                    ("gold", "logits", 2.0, True)])
def test_xtok_bf16_head_close_to_fp32(pair, method, form, tau, uneven):
    """exact_kl: gradients within GRAD_RTOL (measured ~8e-3). uld / gold rank both distributions (ULD's sorted
    L1): their gradient is a sign that flips wherever two sorted probabilities cross, so any rounding moves it
    by ~10% (fp32 alone, operands perturbed by 2⁻⁸: 7-18%); there the bound is 2.5x that fp32 sensitivity."""
    teacher = _teacher(pair, form, tau)
    ref, g_ref = _xtok(pair, teacher, method, tau, bf16=False)
    got, g_got = _xtok(pair, teacher, method, tau, bf16=True)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_got)
    assert float(ref.abs().sum()) > 1.0  # a real loss
    err = abs(float(got.sum() - ref.sum())) / float(ref.abs().sum())
    assert 0 < err < LOSS_RTOL  # > 0: the bf16 matmuls really ran
    bounds = ([GRAD_RTOL] * 3 if method == "exact_kl"
              else [2.5 * e for e in _perturbed_grad_error(pair, teacher, method, tau, g_ref)])
    for a, b, bound in zip(g_got, g_ref, bounds):
        assert 0 < _rel(a, b) < bound
    assert g_got[1][pair[1].student_vocab:].abs().sum() == 0  # padded head rows learn nothing
    if uneven:  # per-row weights: the backward recomputes the chunks, in bf16 too
        weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1))
        _, g_ref_w = _xtok(pair, teacher, method, tau, bf16=False, weights=weights)
        _, g_got_w = _xtok(pair, teacher, method, tau, bf16=True, weights=weights)
        for a, b, bound in zip(g_got_w, g_ref_w, bounds):
            assert 0 < _rel(a, b) < bound


@pytest.mark.parametrize("form", ["lazy", "sparse"])
def test_xtok_bf16_head_in_vocabulary_blocks(pair, form, monkeypatch):
    """The bf16 matmuls run ``HEAD_BLOCK`` vocabulary rows at a time; with 96-row blocks (7 blocks, the last one
    short) the result is the one-block result up to bf16 rounding of the partial ``dh`` sums, and as close to fp32."""
    teacher = _teacher(pair, form, 1.0)
    ref, g_ref = _xtok(pair, teacher, "exact_kl", 1.0, bf16=False)
    one, g_one = _xtok(pair, teacher, "exact_kl", 1.0, bf16=True)
    monkeypatch.setattr(chunked, "HEAD_BLOCK", 96)
    got, g_got = _xtok(pair, teacher, "exact_kl", 1.0, bf16=True)
    assert pair[1].student_vocab > 6 * 96
    torch.testing.assert_close(got, one)  # the logits: the same bf16 products, block by block
    for a, b, r in zip(g_got, g_one, g_ref):
        assert _rel(a, b) < 1e-2 and _rel(a, r) < GRAD_RTOL


def test_xtok_fp64_ignores_autocast(pair):
    teacher = _teacher(pair, "lazy", 1.0, torch.float64)
    ref, g_ref = _xtok(pair, teacher, "exact_kl", 1.0, bf16=False, dtype=torch.float64)
    got, g_got = _xtok(pair, teacher, "exact_kl", 1.0, bf16=True, dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, ref)
    for a, b in zip(g_got, g_ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_teacher,block", [(False, None), (True, None), (False, 96)])
def test_chunked_bf16_head_close_to_fp32(with_teacher, block, monkeypatch):
    """The same-vocabulary chunked loss: CE alone (the cross-tokenizer loop's CE) and CE + dense forward KL; one
    bf16 head block, and 96-row blocks (8 blocks, the last one short)."""
    if block is not None:
        monkeypatch.setattr(chunked, "HEAD_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    b_, t_, hid, v = 2, 24, 64, 700
    hidden = torch.randn(b_, t_, hid, generator=g)
    weight = torch.randn(v + 4, hid, generator=g) * 0.3
    bias = torch.randn(v + 4, generator=g) * 0.3
    labels = torch.randint(0, v, (b_, t_), generator=g)
    labels[0, :3] = -100
    teacher = TeacherTargets(hidden=torch.randn(b_, t_, 32, generator=g),
                             lm_head_weight=torch.randn(v, 32, generator=g) * 0.4) if with_teacher else None
    out = []
    for bf16 in (False, True):
        h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, stats = chunked_distill_loss(h, w, teacher, labels, kd="forward_kl", kd_weight=float(with_teacher),
                                               ce_weight=1.0, n_tokens=float((labels != -100).sum()), chunk_size=10,
                                               vocab_size=v, lm_head_bias=b)
            loss.backward()
        out.append((loss.detach(), stats, h.grad, w.grad, b.grad))
    (ref, s_ref, *g_ref), (got, s_got, *g_got) = out
    assert got.dtype == torch.float32 and float(ref) > 1.0
    assert 0 < abs(float(got - ref)) / float(ref) < LOSS_RTOL
    assert abs(s_got["ce_sum"] - s_ref["ce_sum"]) / s_ref["ce_sum"] < LOSS_RTOL
    for a, b in zip(g_got, g_ref):
        assert a.dtype == torch.float32 and 0 < _rel(a, b) < GRAD_RTOL
    assert g_got[1][v:].abs().sum() == 0

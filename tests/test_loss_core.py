"""Losses: hand-computed values, F.kl_div, JSD limits, chunked == full, sparse k=V == dense, masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import (KD_LOSSES, chunked_distill_loss, cross_entropy, distill_loss_full, divergence,
                               forward_kl, jsd, reduce, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd)
from distillery.targets import TeacherTargets, sparse_from_logits

P = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
Q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _one(v):  # a (1, 1, V) logits tensor whose softmax is v
    return v.log().reshape(1, 1, -1)


def kl(a, b):
    return float((a * (a / b).log()).sum())


def test_hand_computed_values():
    t, s = _one(P), _one(Q)
    assert forward_kl(s, t).item() == pytest.approx(kl(P, Q), rel=1e-12)
    assert reverse_kl(s, t).item() == pytest.approx(kl(Q, P), rel=1e-12)
    m = 0.3 * P + 0.7 * Q
    assert jsd(s, t, beta=0.3).item() == pytest.approx(0.3 * kl(P, m) + 0.7 * kl(Q, m), rel=1e-12)
    assert skew_forward_kl(s, t, alpha=0.1).item() == pytest.approx(kl(P, 0.1 * P + 0.9 * Q), rel=1e-12)
    assert skew_reverse_kl(s, t, alpha=0.1).item() == pytest.approx(kl(Q, 0.1 * Q + 0.9 * P), rel=1e-12)
    assert tvd(s, t).item() == pytest.approx(0.5 * float((P - Q).abs().sum()), rel=1e-12)
    assert cross_entropy(s, torch.tensor([[1]])).item() == pytest.approx(-math.log(0.3), rel=1e-12)
    # temperature softens both sides
    pt, qt = P ** 0.5 / (P ** 0.5).sum(), Q ** 0.5 / (Q ** 0.5).sum()
    assert forward_kl(s, t, loss_temperature=2.0).item() == pytest.approx(kl(pt, qt), rel=1e-10)


def test_against_torch_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 50), torch.randn(3, 4, 50)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    ref_f = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    ref_r = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(forward_kl(s, t), ref_f)
    torch.testing.assert_close(reverse_kl(s, t), ref_r)
    torch.testing.assert_close(jsd(s, t, beta=0.0), ref_f, rtol=0, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1.0), ref_r, rtol=0, atol=0)


def test_jsd_limits():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 40, dtype=torch.float64), torch.randn(2, 3, 40, dtype=torch.float64)
    eps = 1e-5
    torch.testing.assert_close(jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kd", KD_LOSSES)
@pytest.mark.parametrize("form", ["tensor", "lazy", "sparse_kV"])
def test_chunked_equals_full(kd, form):
    torch.manual_seed(2)
    B, T, H, V = 2, 7, 16, 64
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    th, tw = torch.randn(B, T, H), torch.randn(V, H)
    t_logits = F.linear(th, tw)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    teacher = {"tensor": t_logits, "lazy": TeacherTargets(hidden=th, lm_head_weight=tw),
               "sparse_kV": sparse_from_logits(t_logits, V, 1.5)}[form]
    kw = dict(kd=kd, beta=0.3, alpha=0.2, loss_temperature=1.5, kd_weight=0.8, ce_weight=0.4, n_tokens=11)
    l1, s1 = chunked_distill_loss(h, w, teacher, labels, chunk_size=4, **kw)
    g1 = torch.autograd.grad(l1, [h, w])
    l2, s2 = distill_loss_full(h, w, t_logits, labels, **kw)
    g2 = torch.autograd.grad(l2, [h, w])
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1[1], g2[1], rtol=1e-5, atol=1e-5)
    assert s1["tokens"] == 11


def test_all_masked_gives_zero_not_nan():
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss, stats = chunked_distill_loss(h, w, torch.randn(2, 3, 20), labels, n_tokens=0, ce_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.isfinite(w.grad).all()
    per = forward_kl(torch.randn(2, 3, 20), torch.randn(2, 3, 20), mask=labels != -100)
    assert reduce(per, labels != -100, 0).item() == 0.0


def test_accumulation_4x2_equals_batch_of_8():
    torch.manual_seed(3)
    h = torch.randn(8, 5, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t = torch.randn(8, 5, 30)
    labels = torch.randint(0, 30, (8, 5))
    labels[1, :4] = -100
    n = int((labels != -100).sum())
    big, _ = chunked_distill_loss(h, w, t, labels, n_tokens=n, ce_weight=0.5)
    g_big = torch.autograd.grad(big, [h, w])
    gh, gw = torch.zeros_like(h), torch.zeros_like(w)
    for i in range(4):
        sl = slice(2 * i, 2 * i + 2)
        hh = h[sl].detach().requires_grad_()
        small, _ = chunked_distill_loss(hh, w, t[sl], labels[sl], n_tokens=n, ce_weight=0.5)
        a, b = torch.autograd.grad(small, [hh, w])
        gh[sl] += a
        gw += b
    torch.testing.assert_close(gh, g_big[0])
    torch.testing.assert_close(gw, g_big[1])


def test_sparse_temperature_mismatch_and_padded_vocab():
    t = torch.randn(1, 2, 520)
    sp = sparse_from_logits(t, 8, loss_temperature=1.0, vocab_size=512)
    with pytest.raises(ValueError, match="loss_temperature=1.0"):
        forward_kl(torch.randn(1, 2, 512), sp, loss_temperature=2.0)
    # teacher padded to 520 columns, student 512: only the first 512 count
    s = torch.randn(1, 2, 512)
    torch.testing.assert_close(forward_kl(s, t, vocab_size=512), forward_kl(s, t[..., :512]))


def test_sparse_forward_kl_is_exact_on_kept_mass():
    torch.manual_seed(4)
    s, t = torch.randn(1, 3, 100, dtype=torch.float64), torch.randn(1, 3, 100, dtype=torch.float64) * 3
    sp = sparse_from_logits(t, 10, 1.0)
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    ids = sp.topk_ids
    kept = (lp.gather(-1, ids).exp() * (lp.gather(-1, ids) - lq.gather(-1, ids))).sum(-1)
    p_tail = 1 - lp.gather(-1, ids).exp().sum(-1)
    q_tail = 1 - lq.gather(-1, ids).exp().sum(-1)
    expected = kept + p_tail * (p_tail.log() - q_tail.log())
    torch.testing.assert_close(divergence("forward_kl", s, sp), expected, rtol=1e-6, atol=1e-9)
    # the tail bucket is a lower bound of the dense KL (log-sum inequality)
    assert torch.all(divergence("forward_kl", s, sp) <= forward_kl(s, t) + 1e-9)


def test_trl_jsd_parity():
    trl = pytest.importorskip("trl.experimental.gkd", reason="TRL not installed (the test and bench extras)")
    torch.manual_seed(5)
    s, t = torch.randn(2, 6, 40), torch.randn(2, 6, 40)
    labels = torch.randint(0, 40, (2, 6))
    for beta in (0.0, 0.5, 0.9, 1.0):
        ref = trl.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.0, reduction="sum")
        ours = jsd(s, t, beta=beta).sum()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

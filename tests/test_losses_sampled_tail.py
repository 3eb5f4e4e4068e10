"""Sparse targets with a sampled tail: unbiased forward KL (value and gradient), the fused kernel, the fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import KD_LOSSES, chunked_distill_loss, distill_loss_full, divergence, forward_kl
from distillery.targets import TeacherTargets, sample_tail, sparse_from_logits

V = 40


def _logits(shape, seed, scale=2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_sample_tail_draws_by_hand():
    """p over 6 ids, top-2 = {1, 4}; the tail {0, 2, 3, 5} has masses (0.1, 0.2, 0, 0.1) of p_tail = 0.4:
    stratum j of M = 4 covers cdf [j/4, (j+1)/4) of the tail, so the draws are 0, 2, 2, 5 (id 3 has no mass)."""
    p = torch.tensor([[0.1, 0.35, 0.2, 0.0, 0.25, 0.1]], dtype=torch.float64)
    lp = p.clamp(min=1e-300).log()
    ids = sample_tail(lp, torch.tensor([[1, 4]]), torch.full((1, 4), 0.5, dtype=torch.float64))
    assert ids.tolist() == [[0, 2, 2, 5]]
    ids = sample_tail(lp, torch.tensor([[1, 4]]), torch.tensor([[0.0, 0.999, 0.0, 1 - 2 ** -53]], dtype=torch.float64))
    assert ids.tolist() == [[0, 2, 2, 5]]  # stratum edges: never a top id, never the massless id 3


def test_sample_tail_frequencies_follow_the_tail_distribution():
    logits = _logits((1, 1, V), 1)
    n, m = 4000, 4
    t = sparse_from_logits(logits.expand(1, n, V), 5, 1.0, tail_samples=m, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)[0, 0]
    top = set(t.topk_ids[0, 0].tolist())
    draws = t.sample_ids.reshape(-1)
    assert not top & set(draws.tolist())
    freq = torch.bincount(draws, minlength=V).double() / draws.numel()
    want = p.clone()
    want[list(top)] = 0
    want /= want.sum()
    assert (freq - want).abs().max() < 0.01
    assert torch.equal(t.sample_ids, t.sample_ids.sort(-1).values)  # one draw per stratum, in id order
    assert torch.allclose(t.sample_logprobs, logits.log_softmax(-1).expand(1, n, V).gather(-1, t.sample_ids))


def test_estimator_and_gradient_are_unbiased():
    """Mean over many independent draws (positions with the same p, q) == the dense forward KL and its gradient."""
    tl, sl = _logits((V,), 2), _logits((V,), 3)
    p, q = tl.softmax(-1), sl.softmax(-1)
    exact = float((p * (p.log() - q.log())).sum())
    n = 20_000
    t = sparse_from_logits(tl.expand(1, n, V), 5, 1.0, tail_samples=4, generator=torch.Generator().manual_seed(1))
    s = sl.expand(1, n, V).clone().requires_grad_(True)
    est = forward_kl(s, t)[0]  # (n,)
    est.sum().backward()
    est = est.detach()
    stderr = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - exact) < 4 * stderr + 1e-9, (float(est.mean()), exact, stderr)
    bucket = float(forward_kl(sl.expand(1, 1, V), _first(t).without_samples()))
    assert exact - bucket > 50 * stderr  # the tail bucket alone is far off (log-sum inequality)
    g = s.grad[0]  # (n, V): per-position gradients of one draw each
    g_mean, g_err = g.mean(0), g.std(0) / math.sqrt(n)
    assert ((g_mean - (q - p)).abs() <= 5 * g_err + 1e-12).all()
    assert (g_mean - (q - p)).norm() < 0.02 * (q - p).norm()


def _first(t: TeacherTargets) -> TeacherTargets:
    return TeacherTargets(topk_ids=t.topk_ids[:, :1], topk_logprobs=t.topk_logprobs[:, :1],
                          tail_logprob=t.tail_logprob[:, :1], sample_ids=t.sample_ids[:, :1],
                          sample_logprobs=t.sample_logprobs[:, :1], loss_temperature=t.loss_temperature)


def test_value_by_hand():
    """V = 5, top-2 = ids (3, 1) with p = (0.6, 0.25), p_tail = 0.15, draws (0, 0, 4)."""
    s = _logits((1, 1, 5), 4)
    lq = s.log_softmax(-1)[0, 0]
    lp_tail = [math.log(0.05), math.log(0.07)]  # the teacher's log p of ids 0 and 4
    f64 = dict(dtype=torch.float64)
    t = TeacherTargets(topk_ids=torch.tensor([[[3, 1]]]), topk_logprobs=torch.tensor([[[math.log(0.6), math.log(0.25)]]], **f64),
                       tail_logprob=torch.tensor([[math.log(0.15)]], **f64), sample_ids=torch.tensor([[[0, 0, 4]]]),
                       sample_logprobs=torch.tensor([[[lp_tail[0], lp_tail[0], lp_tail[1]]]], dtype=torch.float64),
                       loss_temperature=1.0)
    want = (0.6 * (math.log(0.6) - lq[3]) + 0.25 * (math.log(0.25) - lq[1])
            + 0.15 / 3 * (2 * (lp_tail[0] - lq[0]) + (lp_tail[1] - lq[4])))
    assert float(forward_kl(s, t)) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("name", KD_LOSSES)
def test_which_divergences_use_the_draws(name):
    """forward KL (and jsd β=0, skew_forward_kl α=0, which are forward KL) use the draws; all others ignore
    them and equal the plain top-k + tail-bucket value."""
    tl, sl = _logits((2, 3, V), 5), _logits((2, 3, V), 6)
    t = sparse_from_logits(tl, 6, 1.0, tail_samples=5, generator=torch.Generator().manual_seed(2))
    got = divergence(name, sl, t, beta=0.3, alpha=0.2)
    bucket = divergence(name, sl, t.without_samples(), beta=0.3, alpha=0.2)
    if name == "forward_kl":
        assert not torch.allclose(got, bucket)
    else:
        assert torch.equal(got, bucket)
    fkl = forward_kl(sl, t)
    assert torch.equal(divergence("jsd", sl, t, beta=0.0), fkl)
    assert torch.equal(divergence("skew_forward_kl", sl, t, alpha=0.0), fkl)


@pytest.mark.parametrize("kd,beta,alpha", [("forward_kl", 0.5, 0.1), ("jsd", 0.0, 0.1), ("skew_forward_kl", 0.5, 0.0),
                                           ("reverse_kl", 0.5, 0.1), ("jsd", 0.4, 0.1), ("tvd", 0.5, 0.1)])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_fused_path_equals_reference(kd, beta, alpha, chunk):
    """The chunked kernel (hand-written gradient) == autograd on materialised logits, with a sampled tail."""
    g = torch.Generator().manual_seed(7)
    b, t_len, h_dim = 2, 5, 6
    hidden = torch.randn(b, t_len, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V + 3, h_dim, generator=g, dtype=torch.float64, requires_grad=True)  # 3 padding rows
    labels = torch.randint(0, V, (b, t_len), generator=g)
    labels[0, :2] = -100
    tgt = sparse_from_logits(torch.randn(b, t_len, V, generator=g, dtype=torch.float64) * 2, 7, 2.0,
                             tail_samples=6, generator=g)
    tgt.sample_ids[0, 3, :3] = tgt.sample_ids[0, 3, 4]  # repeated draws add up
    kw = dict(kd=kd, beta=beta, alpha=alpha, loss_temperature=2.0, n_tokens=8, vocab_size=V, ce_weight=0.3)
    l1, s1 = chunked_distill_loss(hidden, weight, tgt, labels, chunk_size=chunk, **kw)
    g1 = torch.autograd.grad(l1, [hidden, weight])
    l2, s2 = distill_loss_full(hidden, weight, tgt, labels, **kw)
    g2 = torch.autograd.grad(l2, [hidden, weight])
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12, abs=1e-14)
    assert s1["kd_sum"] == pytest.approx(s2["kd_sum"], rel=1e-12, abs=1e-14)
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-13)


def test_k_equals_vocab_draws_nothing_and_equals_dense():
    tl, sl = _logits((2, 3, V), 8), _logits((2, 3, V), 9)
    t = sparse_from_logits(tl, V, 1.0, tail_samples=4)
    assert t.n_samples == 0 and t.sample_ids is None
    assert torch.allclose(forward_kl(sl, t), forward_kl(sl, tl), rtol=1e-10, atol=1e-12)


def test_empty_tail_draws_carry_no_weight():
    """All mass on the top-k (tail = −1e30): the draws (arbitrary ids) add exactly nothing; gradients finite."""
    tl = torch.full((1, 2, V), -1e4)  # float32: exp underflows to 0 outside the top-3
    tl[..., :3] = torch.tensor([1.0, 2.0, 3.0])
    t = sparse_from_logits(tl, 3, 1.0, tail_samples=4, generator=torch.Generator().manual_seed(3))
    t.tail_logprob = torch.full_like(t.tail_logprob, -1e30)  # float32 leaves 1 − Σ top-3 ≈ 1e-7: call it empty
    assert torch.isfinite(t.sample_logprobs).all()
    sl = _logits((1, 2, V), 10).float().requires_grad_(True)
    val = forward_kl(sl, t)
    assert torch.allclose(val, forward_kl(sl, t.without_samples()), rtol=0, atol=1e-12)
    val.sum().backward()
    assert torch.isfinite(sl.grad).all()


def test_targets_validate_and_move_the_sampled_tail():
    t = sparse_from_logits(_logits((2, 3, V), 11), 4, 1.0, tail_samples=3)
    assert t.n_samples == 3 and t.width == 4  # width counts the top-k only
    moved = t.to("cpu")
    assert torch.equal(moved.sample_ids, t.sample_ids) and torch.equal(moved.sample_logprobs, t.sample_logprobs)
    ids, lp = t.sample_rows(torch.tensor([5, 0]))
    assert torch.equal(ids, t.sample_ids.reshape(-1, 3)[[5, 0]]) and lp.shape == (2, 3)
    assert t.without_samples().sample_rows() is None and t.without_samples().n_samples == 0
    base = dict(topk_ids=t.topk_ids, topk_logprobs=t.topk_logprobs, tail_logprob=t.tail_logprob, loss_temperature=1.0)
    with pytest.raises(ValueError, match="both sample_ids and sample_logprobs"):
        TeacherTargets(**base, sample_ids=t.sample_ids)
    with pytest.raises(ValueError, match="differ in shape"):
        TeacherTargets(**base, sample_ids=t.sample_ids, sample_logprobs=t.sample_logprobs[..., :2])
    with pytest.raises(ValueError, match="other positions"):
        TeacherTargets(**base, sample_ids=t.sample_ids[:, :2], sample_logprobs=t.sample_logprobs[:, :2])
    with pytest.raises(ValueError, match="only go with the sparse form"):
        TeacherTargets(logits=_logits((2, 3, V), 1), sample_ids=t.sample_ids, sample_logprobs=t.sample_logprobs)
    bad = TeacherTargets(**base, sample_ids=t.sample_ids.clone().fill_(V), sample_logprobs=t.sample_logprobs)
    with pytest.raises(ValueError, match="sampled-tail ids span"):
        forward_kl(_logits((2, 3, V), 1), bad)
    with pytest.raises(ValueError, match="loss_temperature=1.0"):
        forward_kl(_logits((2, 3, V), 1), t, loss_temperature=2.0)

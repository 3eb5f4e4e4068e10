"""Sparse (top-k + tail) teachers: the (K+1)-bucket rule for every divergence, K = V == dense, τ, ids."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.errors import DistilleryError
from distillery.losses import KD_LOSSES, divergence, forward_kl, reduce, reverse_kl
from distillery.losses.sparse import TAIL_FLOOR
from distillery.targets import TeacherTargets, sparse_from_logits

KW = {"beta": 0.3, "alpha": 0.2}


def _rand(shape, seed=0, scale=2.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _bucket_divergence(name: str, P: list[float], Q: list[float], beta: float, alpha: float) -> float:
    """Plain-Python divergence between two discrete distributions (the definitions, written out)."""
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    mix = lambda a, b, w: [w * x + (1 - w) * y for x, y in zip(a, b)]  # noqa: E731
    if name == "forward_kl":
        return kl(P, Q)
    if name == "reverse_kl":
        return kl(Q, P)
    if name == "jsd":
        m = mix(P, Q, beta)
        return beta * kl(P, m) + (1 - beta) * kl(Q, m)
    if name == "skew_forward_kl":
        return kl(P, mix(P, Q, alpha))
    if name == "skew_reverse_kl":
        return kl(Q, mix(Q, P, alpha))
    return 0.5 * sum(abs(x - y) for x, y in zip(P, Q))


@pytest.mark.parametrize("name", KD_LOSSES)
def test_tail_bucket_rule_by_hand(name):
    """K = 2 of V = 5: teacher (p_a, p_b, p_tail) vs student (q_a, q_b, 1 − q_a − q_b)."""
    s = _rand((1, 1, 5), 0)
    ids = torch.tensor([[[3, 1]]])
    lp = torch.tensor([[[math.log(0.6), math.log(0.25)]]], dtype=torch.float64)
    tail = torch.tensor([[math.log(0.15)]], dtype=torch.float64)
    t = TeacherTargets(topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, loss_temperature=1.0)
    q = s.softmax(-1)[0, 0].tolist()
    Q = [q[3], q[1], 1 - q[3] - q[1]]
    want = _bucket_divergence(name, [0.6, 0.25, 0.15], Q, **KW)
    assert divergence(name, s, t, **KW).item() == pytest.approx(want, rel=1e-10, abs=1e-13)


def test_forward_kl_is_exact_on_kept_ids_plus_tail_term():
    s, tl = _rand((2, 3, 20), 0), _rand((2, 3, 20), 1)
    t = sparse_from_logits(tl, 6, 1.0)
    lq = s.log_softmax(-1)
    lq_k = lq.gather(-1, t.topk_ids)
    q_tail = 1 - lq_k.exp().sum(-1)
    want = (t.topk_logprobs.exp() * (t.topk_logprobs - lq_k)).sum(-1) + \
        t.tail_logprob.exp() * (t.tail_logprob - q_tail.log())
    torch.testing.assert_close(forward_kl(s, t), want)


@pytest.mark.parametrize("name", KD_LOSSES)
def test_coarse_grained_divergence_is_below_dense(name):
    """Data-processing inequality: merging outcomes into the tail bucket never increases a divergence."""
    s, tl = _rand((2, 4, 30), 0), _rand((2, 4, 30), 1)
    for k in (1, 5, 29):
        sp = divergence(name, s, sparse_from_logits(tl, k, 1.0), **KW)
        assert (sp <= divergence(name, s, tl, **KW) + 1e-12).all(), (name, k)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name", KD_LOSSES)
def test_k_equals_v_matches_dense_value_and_gradient(name, dtype, tol):
    for tau in (1.0, 2.0):
        s = _rand((2, 3, 16), 0, dtype=dtype).requires_grad_(True)
        tl = _rand((2, 3, 16), 1, dtype=dtype)
        dense = divergence(name, s, tl, loss_temperature=tau, **KW)
        (g_dense,) = torch.autograd.grad(dense.sum(), s)
        sparse = divergence(name, s, sparse_from_logits(tl, 16, tau), **KW)
        (g_sparse,) = torch.autograd.grad(sparse.sum(), s)
        torch.testing.assert_close(sparse, dense, rtol=tol, atol=tol)
        torch.testing.assert_close(g_sparse, g_dense, rtol=tol, atol=tol)


def test_temperature_must_match_the_recorded_one():
    s, tl = _rand((1, 2, 8), 0), _rand((1, 2, 8), 1)
    t = sparse_from_logits(tl, 3, 2.0)
    with pytest.raises(ValueError, match="recorded at loss_temperature=2.0"):
        forward_kl(s, t, loss_temperature=1.0)
    with pytest.raises(DistilleryError):
        reverse_kl(s, t, loss_temperature=3.0)
    torch.testing.assert_close(forward_kl(s, t), forward_kl(s, t, loss_temperature=2.0))  # None = recorded


def test_ids_outside_the_vocabulary_raise():
    s, tl = _rand((1, 2, 8), 0), _rand((1, 2, 10), 1)
    t = sparse_from_logits(tl, 3, 1.0)
    t.topk_ids[0, 0, 0] = 9
    with pytest.raises(ValueError, match="outside the vocabulary"):
        forward_kl(s, t)


def test_vocab_size_with_sparse_targets():
    s, tl = _rand((1, 3, 12), 0), _rand((1, 3, 14), 1)
    t = sparse_from_logits(tl, 4, 1.0, vocab_size=12)  # ids < 12, student padded to 12 already
    torch.testing.assert_close(forward_kl(s, t), forward_kl(s, sparse_from_logits(tl[..., :12], 4, 1.0)))
    s_pad = torch.cat([s, _rand((1, 3, 4), 2)], dim=-1)  # student padded to 16 columns
    torch.testing.assert_close(forward_kl(s_pad, t, vocab_size=12), forward_kl(s, t))


@pytest.mark.parametrize("name", KD_LOSSES)
def test_empty_recorded_tail_is_floored_and_finite(name):
    """tail = -1e30 ('no mass outside the top-k') with K < V: finite values and gradients; the
    reverse-type tail term is q_tail·(log q_tail − TAIL_FLOOR)."""
    s = _rand((1, 1, 6), 0).requires_grad_(True)
    ids = torch.tensor([[[0, 2]]])
    lp = torch.tensor([[[math.log(0.75), math.log(0.25)]]], dtype=torch.float64)
    t = TeacherTargets(topk_ids=ids, topk_logprobs=lp, tail_logprob=torch.full((1, 1), -1e30, dtype=torch.float64),
                       loss_temperature=1.0)
    v = divergence(name, s, t, **KW)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    q = s.detach().softmax(-1)[0, 0]
    Q = [q[0].item(), q[2].item(), 1 - q[0].item() - q[2].item()]
    want = _bucket_divergence(name, [0.75, 0.25, math.exp(TAIL_FLOOR)], Q, **KW)
    assert v.item() == pytest.approx(want, rel=1e-9)


def test_student_tail_gradient_is_finite_when_kept_mass_is_almost_one():
    """q_tail comes from a log-sum-exp over the other columns, not log(1 − Σ q_k): no blow-up."""
    s = torch.tensor([[[40.0, 40.0, -40.0, -40.0]]], dtype=torch.float32, requires_grad=True)
    lp = torch.log(torch.tensor([[[0.5, 0.4]]]))
    t = TeacherTargets(topk_ids=torch.tensor([[[0, 1]]]), topk_logprobs=lp,
                       tail_logprob=torch.log(torch.tensor([[0.1]])), loss_temperature=1.0)
    v = forward_kl(s, t)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    # q_tail = 2·e^-80 / (2·e^40) → log q_tail = -80 exactly: 0.1·(log 0.1 + 80) + kept terms
    want = 0.5 * math.log(0.5 / 0.5) + 0.4 * math.log(0.4 / 0.5) + 0.1 * (math.log(0.1) + 80.0)
    assert v.item() == pytest.approx(want, rel=1e-5)


def test_masked_garbage_rows_give_zero():
    """Cache rows without a target hold zeros (ids 0 repeated, log-probs 0, tail 0): masked, they are 0."""
    s = _rand((1, 3, 7), 0).requires_grad_(True)
    t = sparse_from_logits(_rand((1, 3, 7), 1), 3, 1.0)
    t.topk_ids[0, 1] = 0
    t.topk_logprobs[0, 1] = 0.0
    t.tail_logprob[0, 1] = 0.0
    t.mask = torch.tensor([[True, False, True]])
    for name in KD_LOSSES:
        v = divergence(name, s, t, **KW)
        (g,) = torch.autograd.grad(reduce(v, t.mask, 2), s)
        assert v[0, 1] == 0 and torch.isfinite(g).all() and (g[0, 1] == 0).all(), name

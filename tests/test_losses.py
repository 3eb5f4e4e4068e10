"""Per-token divergences, cross-entropy and reduce (dense teachers): values, limits, masks, vocab widths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.errors import DistilleryError
from distillery.losses import (KD_LOSSES, cross_entropy, divergence, forward_kl, jsd, reduce, reverse_kl,
                               skew_forward_kl, skew_reverse_kl, tvd)
from distillery.targets import TeacherTargets

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.2, 0.5, 0.3]  # student


def _logits(probs, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(probs, dtype=dtype).log().view(1, 1, -1)  # (1, 1, V): softmax(log p) = p


def _kl(a, b) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _rand(shape, seed=0, scale=2.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# ----------------------------------------------------------------------------- hand-computed values
def test_values_by_hand():
    s, t = _logits(Q), _logits(P)
    # two-outcome case written out: KL([.5,.5] ‖ [.25,.75]) = .5 log 2 + .5 log(2/3) = .5 log(4/3)
    assert forward_kl(_logits([0.25, 0.75]), _logits([0.5, 0.5])).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert forward_kl(s, t).item() == pytest.approx(_kl(P, Q), abs=1e-12)
    assert reverse_kl(s, t).item() == pytest.approx(_kl(Q, P), abs=1e-12)
    assert tvd(s, t).item() == pytest.approx(0.5, abs=1e-12)  # ½(.5 + .3 + .2)
    for beta in (0.1, 0.5, 0.9):
        m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
        want = beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
        assert jsd(s, t, beta=beta).item() == pytest.approx(want, abs=1e-12)
    for alpha in (0.1, 0.6):
        m_f = [alpha * p + (1 - alpha) * q for p, q in zip(P, Q)]
        m_r = [alpha * q + (1 - alpha) * p for p, q in zip(P, Q)]
        assert skew_forward_kl(s, t, alpha=alpha).item() == pytest.approx(_kl(P, m_f), abs=1e-12)
        assert skew_reverse_kl(s, t, alpha=alpha).item() == pytest.approx(_kl(Q, m_r), abs=1e-12)


def test_cross_entropy_matches_torch_and_ignores_minus_100():
    z = _rand((2, 5, 11))
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    y[0, 1] = -100
    ce = cross_entropy(z, y)
    assert ce.shape == (2, 5) and ce[0, 1] == 0
    want = F.cross_entropy(z.reshape(-1, 11), y.reshape(-1), ignore_index=-100, reduction="none").view(2, 5)
    torch.testing.assert_close(ce, want)
    y2 = y.clamp(max=7).masked_fill(y == -100, -100)
    torch.testing.assert_close(cross_entropy(z, y2, vocab_size=8), cross_entropy(z[..., :8], y2))


# ----------------------------------------------------------------------------- against torch's kl_div
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kl_matches_torch_kl_div(tau):
    s, t = _rand((2, 4, 17), 0), _rand((2, 4, 17), 1)
    lq, lp = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
    torch.testing.assert_close(forward_kl(s, t, loss_temperature=tau),
                               F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(reverse_kl(s, t, loss_temperature=tau),
                               F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1))


def test_temperature_softens_both_sides():
    s, t = _rand((2, 3, 9), 0), _rand((2, 3, 9), 1)
    for name in KD_LOSSES:
        torch.testing.assert_close(divergence(name, s, t, loss_temperature=3.0),
                                   divergence(name, s / 3.0, t / 3.0, loss_temperature=1.0))


# ----------------------------------------------------------------------------- limits and definitions
def test_jsd_ends_are_exactly_forward_and_reverse_kl():
    s, t = _rand((3, 4, 13), 0), _rand((3, 4, 13), 1)
    assert torch.equal(jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(jsd(s, t, beta=1.0), reverse_kl(s, t))


def test_jsd_small_beta_limits():
    """jsd(β)/β → KL(p‖q) as β → 0 and jsd(β)/(1−β) → KL(q‖p) as β → 1, with an O(β) error."""
    s, t = _rand((3, 4, 13), 0, scale=1.0), _rand((3, 4, 13), 1, scale=1.0)
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    torch.testing.assert_close(jsd(s, t, beta=1e-4) / 1e-4, fkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1 - 1e-4) / 1e-4, rkl, rtol=1e-3, atol=0)
    # the error is first order in ε (its constant grows with χ² between the two, so check the rate)
    err = lambda f, want, eps: ((f(eps) / eps - want) / want).abs().max().item()  # noqa: E731
    near0, near1 = (lambda e: jsd(s, t, beta=e)), (lambda e: jsd(s, t, beta=1 - e))
    for f, want in ((near0, fkl), (near1, rkl)):
        assert err(f, want, 1e-6) < err(f, want, 1e-4) / 50 < 1e-4


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    s, t = _rand((2, 5, 7), 0, scale=6.0), _rand((2, 5, 7), 1, scale=6.0)
    a, b = jsd(s, t, beta=0.5), jsd(t, s, beta=0.5)
    torch.testing.assert_close(a, b)
    assert (a >= 0).all() and (a <= math.log(2) + 1e-12).all()


def test_skew_kls_are_kl_to_the_mixture():
    s, t = _rand((2, 3, 10), 0), _rand((2, 3, 10), 1)
    p, q = t.softmax(-1), s.softmax(-1)
    for alpha in (0.1, 0.5):
        m_f = (alpha * p + (1 - alpha) * q).log()  # as logits: softmax(log m) = m
        m_r = (alpha * q + (1 - alpha) * p).log()
        torch.testing.assert_close(skew_forward_kl(s, t, alpha=alpha), forward_kl(m_f, t))
        torch.testing.assert_close(skew_reverse_kl(s, t, alpha=alpha), forward_kl(m_r, s))
    assert torch.equal(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert (skew_forward_kl(s, t, alpha=1.0) == 0).all() and (skew_reverse_kl(s, t, alpha=1.0) == 0).all()


def test_identical_distributions_give_zero():
    s = _rand((2, 3, 10), 0)
    for name in KD_LOSSES:
        assert divergence(name, s, s.clone()).abs().max() < 1e-12, name


def test_zero_probabilities_stay_finite():
    """p = [1, 0], q = [0, 1] to fp precision (logits 0 and -1e4): no NaN in values or gradients."""
    s = torch.tensor([[[-1e4, 0.0]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0.0, -1e4]]], dtype=torch.float64)
    want = {"forward_kl": 1e4, "reverse_kl": 1e4, "jsd": math.log(2), "tvd": 1.0}
    for name in KD_LOSSES:
        s.grad = None
        v = divergence(name, s, t)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(s.grad).all(), name
        if name in want:
            assert v.item() == pytest.approx(want[name], rel=1e-9), name


# ----------------------------------------------------------------------------- masks, reduce, accumulation
def test_masked_positions_are_exactly_zero_with_zero_gradient():
    s = _rand((2, 4, 9), 0).requires_grad_(True)
    t = _rand((2, 4, 9), 1)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    for name in KD_LOSSES:
        s.grad = None
        v = divergence(name, s, t, mask=mask)
        assert (v[~mask] == 0).all() and (v[mask] > 0).all(), name
        reduce(v, mask, 4).backward()
        assert torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all(), name


def test_teacher_targets_mask_is_combined():
    s, t = _rand((1, 4, 6), 0), _rand((1, 4, 6), 1)
    tmask = torch.tensor([[True, True, False, True]])
    v = forward_kl(s, TeacherTargets(logits=t, mask=tmask), mask=torch.tensor([[True, False, True, True]]))
    assert v[0, 1] == 0 and v[0, 2] == 0 and v[0, 0] > 0 and v[0, 3] > 0


def test_reduce_all_masked_is_zero_not_nan():
    s = _rand((2, 3, 5), 0).requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = reduce(forward_kl(s, _rand((2, 3, 5), 1), mask=mask), mask, 0)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    with pytest.raises(ValueError):
        reduce(torch.zeros(2, 3), mask, -1)


def test_reduce_value():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert reduce(per, mask, 5).item() == pytest.approx((1 + 3 + 6) / 5)


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    """One global n_tokens for the window: accumulated gradients equal the single-batch gradient."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 6, 4, generator=g, dtype=torch.float64)
    t = torch.randn(8, 6, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (8, 6), generator=g)
    labels[torch.rand(8, 6, generator=g) < 0.4] = -100  # uneven target counts per micro-batch
    labels[2] = -100  # one sequence without any target
    w = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    n_tokens = int((labels != -100).sum())

    def loss(sl):
        mask = labels[sl] != -100
        z = h[sl] @ w.T  # (b, T, V)
        per = jsd(z, t[sl], beta=0.3, mask=mask) + 0.5 * cross_entropy(z, labels[sl])
        return reduce(per, mask, n_tokens)

    loss(slice(0, 8)).backward()
    whole = w.grad.clone()
    w.grad = None
    total = 0.0
    for i in range(0, 8, 2):  # 4 micro-batches of 2, gradients accumulate
        micro = loss(slice(i, i + 2))
        micro.backward()
        total = total + micro.detach()
    torch.testing.assert_close(w.grad, whole)
    torch.testing.assert_close(total, loss(slice(0, 8)).detach())


# ----------------------------------------------------------------------------- vocabulary widths, teacher forms
def test_vocab_size_truncation_520_vs_512():
    s = _rand((2, 3, 512), 0)
    t = _rand((2, 3, 520), 1)
    for name in KD_LOSSES:
        torch.testing.assert_close(divergence(name, s, t, vocab_size=512), divergence(name, s, t[..., :512]))
    with pytest.raises(ValueError, match="vocab_size"):
        forward_kl(s, t)
    with pytest.raises(ValueError, match="vocab_size"):
        forward_kl(s, t, vocab_size=516)  # wider than the student
    # the student may be the padded one too
    torch.testing.assert_close(forward_kl(t, s, vocab_size=512), forward_kl(t[..., :512], s))
    # TeacherTargets.vocab_size is used when the argument is absent; a contradiction raises
    torch.testing.assert_close(forward_kl(s, TeacherTargets(logits=t, vocab_size=512)), forward_kl(s, t[..., :512]))
    with pytest.raises(ValueError, match="disagrees"):
        forward_kl(s, TeacherTargets(logits=t, vocab_size=512), vocab_size=500)


def test_lazy_teacher_equals_dense():
    g = torch.Generator().manual_seed(3)
    th = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    tw = torch.randn(13, 8, generator=g, dtype=torch.float64)
    tb = torch.randn(13, generator=g, dtype=torch.float64)
    s = _rand((2, 5, 13), 4)
    lazy = TeacherTargets(hidden=th, lm_head_weight=tw, lm_head_bias=tb)
    for name in KD_LOSSES:
        torch.testing.assert_close(divergence(name, s, lazy, loss_temperature=1.5),
                                   divergence(name, s, th @ tw.T + tb, loss_temperature=1.5))


def test_dispatcher_and_bad_arguments():
    s, t = _rand((1, 2, 5), 0), _rand((1, 2, 5), 1)
    direct = {"forward_kl": forward_kl(s, t), "reverse_kl": reverse_kl(s, t), "jsd": jsd(s, t, beta=0.2),
              "skew_forward_kl": skew_forward_kl(s, t, alpha=0.3), "skew_reverse_kl": skew_reverse_kl(s, t, alpha=0.3),
              "tvd": tvd(s, t)}
    for name, want in direct.items():
        assert torch.equal(divergence(name, s, t, beta=0.2, alpha=0.3), want), name
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("kl", s, t)
    with pytest.raises(ValueError, match="beta"):
        jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        skew_forward_kl(s, t, alpha=-0.1)
    with pytest.raises(ValueError, match="loss_temperature"):
        forward_kl(s, t, loss_temperature=0.0)
    with pytest.raises(DistilleryError):  # a user-caused error the CLI prints as one line
        forward_kl(s, _rand((1, 2, 6), 1))


def test_fp32_inputs_compute_in_fp32_and_bf16_is_upcast():
    s, t = _rand((1, 2, 7), 0, dtype=torch.float32), _rand((1, 2, 7), 1, dtype=torch.float32)
    assert forward_kl(s, t).dtype == torch.float32
    torch.testing.assert_close(forward_kl(s.bfloat16(), t), forward_kl(s.bfloat16().float(), t))


def test_positions_must_line_up():
    with pytest.raises(ValueError, match="positions"):
        forward_kl(_rand((2, 3, 5), 0), _rand((3, 2, 5), 1))

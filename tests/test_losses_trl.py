"""Our generalized JSD against TRL's ``GKDTrainer.generalized_jsd_loss`` (the peer), when TRL is installed."""

from __future__ import annotations

import os

import pytest
import torch

from distillery.losses import chunked_distill_loss, jsd

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer",
                          reason="TRL not installed (the test and bench extras: pip install -e '.[test]')")


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_per_token(beta, tau):
    g = torch.Generator().manual_seed(int(beta * 10) + int(tau))
    s = torch.randn(2, 6, 50, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 6, 50, generator=g, dtype=torch.float64) * 3
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=tau, reduction="none").sum(-1)  # (B, T)
    torch.testing.assert_close(jsd(s, t, beta=beta, loss_temperature=tau), theirs, rtol=1e-12, atol=1e-12)


def test_fused_jsd_matches_trl_sum_over_labels():
    """TRL's masked sum / global token count (num_items_in_batch) == our fused loss with kd_t2_scale off."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g).requires_grad_(True)
    w = torch.randn(64, 16, generator=g).requires_grad_(True)
    t = torch.randn(2, 9, 64, generator=g) * 2
    labels = torch.randint(0, 64, (2, 9), generator=g)
    labels[0, :4] = -100
    theirs = gkd.GKDTrainer.generalized_jsd_loss(h @ w.T, t, labels=labels, beta=0.5, num_items_in_batch=20)
    theirs.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ours, _ = chunked_distill_loss(h, w, t, labels, kd="jsd", beta=0.5, n_tokens=20, chunk_size=4)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, g_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, g_w, rtol=1e-4, atol=1e-6)

"""The fused chunked objective == the materialised reference, for every divergence and teacher form."""

from __future__ import annotations

import pytest
import torch

from distillery.losses import KD_LOSSES, chunked_distill_loss, distill_loss_full
from distillery.losses.chunked import _teacher_rows_into
from distillery.targets import TeacherTargets, sparse_from_logits

B, T, H, V = 2, 7, 8, 33


def _setup(dtype=torch.float64, seed=0, vocab=V, teacher_vocab=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(vocab, H, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_(True)
    th = torch.randn(B, T, H, generator=g, dtype=dtype)
    tw = torch.randn(teacher_vocab, H, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, min(vocab, teacher_vocab), (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, 5] = -100
    return h, w, b, th, tw, labels


def _teachers(th, tw, tau):
    tl = th @ tw.T
    return {"dense": tl, "lazy": TeacherTargets(hidden=th, lm_head_weight=tw),
            "sparse_k5": sparse_from_logits(tl, 5, tau), "sparse_kV": sparse_from_logits(tl, tw.shape[0], tau)}


def _run(fn, h, w, b, teacher, labels, **kw):
    for x in (h, w, b):
        x.grad = None
    loss, stats = fn(h, w, teacher, labels, lm_head_bias=b, **kw)
    loss.backward()
    return loss.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone(), stats


def _assert_same(a, b, tol):
    for x, y, what in zip(a[:4], b[:4], ("loss", "grad hidden", "grad weight", "grad bias")):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, what=what: f"{what}: {m}")
    for key in ("kd_sum", "ce_sum", "tokens"):
        assert a[4][key] == pytest.approx(b[4][key], rel=tol, abs=tol), key


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("form", ["dense", "lazy", "sparse_k5", "sparse_kV"])
@pytest.mark.parametrize("kd", KD_LOSSES)
def test_chunked_equals_full_fp64(kd, form, tau):
    h, w, b, th, tw, labels = _setup()
    teacher = _teachers(th, tw, tau)[form]
    kw = dict(kd=kd, beta=0.3, alpha=0.2, loss_temperature=tau, kd_weight=1.0, ce_weight=0.5, n_tokens=11)
    full = _run(distill_loss_full, h, w, b, teacher, labels, **kw)
    chunked = _run(chunked_distill_loss, h, w, b, teacher, labels, chunk_size=3, **kw)
    _assert_same(chunked, full, 1e-10)
    assert full[4]["tokens"] == 10.0 and full[0] > 0  # 14 positions, 4 masked; n_tokens is the window's count


@pytest.mark.parametrize("kd", ["jsd", "forward_kl", "skew_reverse_kl", "tvd"])
def test_chunked_equals_full_fp32(kd):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 40, 32, generator=g).requires_grad_(True)
    w = (torch.randn(300, 32, generator=g) / 2).requires_grad_(True)
    b = torch.zeros(300).requires_grad_(True)
    teacher = torch.randn(3, 40, 300, generator=g) * 3
    labels = torch.randint(0, 300, (3, 40), generator=g)
    labels[:, :10] = -100
    kw = dict(kd=kd, beta=0.5, alpha=0.1, loss_temperature=1.0, kd_weight=1.0, ce_weight=1.0, n_tokens=90)
    full = _run(distill_loss_full, h, w, b, teacher, labels, **kw)
    chunked = _run(chunked_distill_loss, h, w, b, teacher, labels, chunk_size=16, **kw)
    _assert_same(chunked, full, 2e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 11, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    h, w, b, th, tw, labels = _setup(seed=2)
    kw = dict(kd="jsd", beta=0.5, loss_temperature=1.0, ce_weight=0.2, n_tokens=11)
    ref = _run(distill_loss_full, h, w, b, th @ tw.T, labels, **kw)
    _assert_same(_run(chunked_distill_loss, h, w, b, th @ tw.T, labels, chunk_size=chunk_size, **kw), ref, 1e-10)


@pytest.mark.parametrize("fn", [chunked_distill_loss, distill_loss_full])
def test_all_masked_gives_zero_and_finite_zero_gradients(fn):
    h, w, b, th, tw, labels = _setup()
    labels = torch.full_like(labels, -100)
    for teacher in (th @ tw.T, sparse_from_logits(th @ tw.T, 4, 1.0)):
        loss, gh, gw, gb, stats = _run(fn, h, w, b, teacher, labels, kd="jsd", ce_weight=1.0, n_tokens=0,
                                       chunk_size=4)
        assert loss.item() == 0.0 and stats == {"kd_sum": 0.0, "ce_sum": 0.0, "tokens": 0.0, "kd_scale": 1.0}
        for g in (gh, gw, gb):
            assert torch.isfinite(g).all() and (g == 0).all()


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(8, 6, H, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(8, 6, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (8, 6), generator=g)
    labels[torch.rand(8, 6, generator=g) < 0.4] = -100
    labels[5] = -100
    n_tokens = int((labels != -100).sum())  # counted once for the whole window
    kw = dict(kd="skew_forward_kl", alpha=0.1, ce_weight=0.5, n_tokens=n_tokens, chunk_size=4)
    whole, _ = chunked_distill_loss(h, w, teacher, labels, **kw)
    whole.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    total, kd_sum = 0.0, 0.0
    for i in range(0, 8, 2):
        part, stats = chunked_distill_loss(h[i:i + 2], w, teacher[i:i + 2], labels[i:i + 2], **kw)
        part.backward()
        total, kd_sum = total + part.detach(), kd_sum + stats["kd_sum"]
    torch.testing.assert_close(total, whole.detach())
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_vocab_size_truncation_teacher_520_student_512():
    h, w, b, th, tw, labels = _setup(vocab=512, teacher_vocab=520)
    teacher = th @ tw.T  # (B, T, 520)
    kw = dict(kd="jsd", beta=0.5, ce_weight=0.3, n_tokens=11, vocab_size=512)
    ref = _run(distill_loss_full, h, w, b, teacher[..., :512], labels, **{**kw, "vocab_size": None})
    _assert_same(_run(chunked_distill_loss, h, w, b, teacher, labels, chunk_size=4, **kw), ref, 1e-10)
    _assert_same(_run(distill_loss_full, h, w, b, teacher, labels, **kw), ref, 1e-10)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_distill_loss(h, w, teacher, labels, kd="jsd", n_tokens=11)


def test_padded_student_head_rows_get_zero_gradient():
    h, w, b, th, tw, labels = _setup(vocab=40, teacher_vocab=36)
    teacher = TeacherTargets(hidden=th, lm_head_weight=tw)
    kw = dict(kd="reverse_kl", ce_weight=1.0, n_tokens=11, vocab_size=33)
    chunked = _run(chunked_distill_loss, h, w, b, teacher, labels, chunk_size=3, **kw)
    _assert_same(chunked, _run(distill_loss_full, h, w, b, teacher, labels, **kw), 1e-10)
    assert (chunked[2][33:] == 0).all() and (chunked[3][33:] == 0).all() and chunked[2].shape == (40, H)


def test_teacher_mask_turns_kd_off_but_keeps_ce():
    h, w, b, th, tw, labels = _setup()
    tmask = torch.ones(B, T, dtype=torch.bool)
    tmask[1, 2:4] = False
    for teacher in (TeacherTargets(logits=th @ tw.T, mask=tmask), sparse_from_logits(th @ tw.T, 6, 1.0, mask=tmask)):
        kw = dict(kd="forward_kl", ce_weight=1.0, n_tokens=11)
        full = _run(distill_loss_full, h, w, b, teacher, labels, **kw)
        _assert_same(_run(chunked_distill_loss, h, w, b, teacher, labels, chunk_size=4, **kw), full, 1e-10)
        unmasked = TeacherTargets(logits=th @ tw.T)
        assert full[4]["kd_sum"] < _run(distill_loss_full, h, w, b, unmasked, labels, **kw)[4]["kd_sum"]


def test_ce_only_without_teacher():
    h, w, b, th, tw, labels = _setup()
    kw = dict(kd_weight=0.0, ce_weight=1.0, n_tokens=11)
    full = _run(distill_loss_full, h, w, b, None, labels, **kw)
    _assert_same(_run(chunked_distill_loss, h, w, b, None, labels, chunk_size=3, **kw), full, 1e-10)
    ce = torch.nn.functional.cross_entropy((h @ w.T + b)[labels != -100], labels[labels != -100], reduction="sum")
    assert full[0].item() == pytest.approx(ce.item() / 11)
    with pytest.raises(ValueError, match="teacher"):
        chunked_distill_loss(h, w, None, labels, n_tokens=11)


def test_t2_scaling_and_grad_output_scaling():
    h, w, b, th, tw, labels = _setup()
    kw = dict(kd="forward_kl", loss_temperature=2.0, n_tokens=11, lm_head_bias=b)
    scaled, stats = chunked_distill_loss(h, w, th @ tw.T, labels, **kw)
    plain, _ = chunked_distill_loss(h, w, th @ tw.T, labels, kd_t2_scale=False, **kw)
    assert stats["kd_scale"] == 4.0
    torch.testing.assert_close(scaled, 4.0 * plain)
    assert plain.item() == pytest.approx(stats["kd_sum"] / 11)
    (3.0 * plain).backward()
    g3 = h.grad.clone()
    h.grad = None
    chunked_distill_loss(h, w, th @ tw.T, labels, kd_t2_scale=False, **kw)[0].backward()
    torch.testing.assert_close(g3, 3.0 * h.grad)


def test_sparse_temperature_mismatch_raises():
    h, w, b, th, tw, labels = _setup()
    t = sparse_from_logits(th @ tw.T, 5, 2.0)
    with pytest.raises(ValueError, match="recorded at loss_temperature=2.0"):
        chunked_distill_loss(h, w, t, labels, loss_temperature=1.0, n_tokens=11)


def test_teacher_rows_written_in_place_equal_dense_logits():
    _, _, _, th, tw, _ = _setup(teacher_vocab=40)
    tb = torch.randn(40, dtype=torch.float64)
    for t in (TeacherTargets(logits=th @ tw.T), TeacherTargets(hidden=th, lm_head_weight=tw, lm_head_bias=tb)):
        for rows in (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 5, 6, 13])):
            out = torch.empty(4, 33, dtype=torch.float64)
            _teacher_rows_into(t, rows, 33, out)
            torch.testing.assert_close(out, t.dense_logits(rows)[:, :33])
    out32 = torch.empty(4, 33)  # another dtype than the teacher's: converted
    _teacher_rows_into(TeacherTargets(logits=th @ tw.T), torch.tensor([0, 5, 6, 13]), 33, out32)
    torch.testing.assert_close(out32, (th @ tw.T).reshape(-1, 40)[[0, 5, 6, 13], :33].float())


def test_frozen_head_and_tied_embedding():
    """A head that needs no gradient is skipped; a tied head accumulates both uses."""
    h, w, b, th, tw, labels = _setup()
    wf = w.detach()
    loss, _ = chunked_distill_loss(h, wf, th @ tw.T, labels, n_tokens=11)
    loss.backward()
    assert h.grad is not None and wf.grad is None
    emb = w  # the same Parameter used as input embedding and LM head
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    hid = emb[ids].tanh()
    outs = []
    for fn in (chunked_distill_loss, distill_loss_full):
        emb.grad = None
        fn(hid, emb, th @ tw.T, labels, kd="jsd", ce_weight=1.0, n_tokens=11)[0].backward(retain_graph=True)
        outs.append(emb.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("kd", KD_LOSSES)
def test_fp32_fused_is_as_accurate_as_fp32_reference(kd):
    """Against an fp64 reference at V = 8,192, the fp32 fused value and gradients are no worse than
    the fp32 materialised path (guards against inaccurate reductions such as fp32 dot products)."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(1, 24, 64, generator=g) / 8
    w = torch.randn(8192, 64, generator=g) * 2
    t = torch.randn(1, 24, 8192, generator=g) * 2
    y = torch.randint(0, 8192, (1, 24), generator=g)
    res = {}
    for name, fn, dt in (("fused", chunked_distill_loss, torch.float32), ("full", distill_loss_full, torch.float32),
                         ("ref", distill_loss_full, torch.float64)):
        hh, ww = h.to(dt).clone().requires_grad_(True), w.to(dt).clone().requires_grad_(True)
        loss, _ = fn(hh, ww, t.to(dt), y, kd=kd, n_tokens=24, chunk_size=8)
        loss.backward()
        res[name] = (loss.double(), hh.grad.double(), ww.grad.double())
    for i in range(3):
        err = lambda k: (res[k][i] - res["ref"][i]).abs().max().item()  # noqa: E731
        assert err("fused") <= 4 * err("full") + 1e-7 * res["ref"][i].abs().max().item(), (kd, i)


@pytest.mark.parametrize("kd", KD_LOSSES)
def test_sparse_k_equals_v_equals_dense_in_the_fused_path(kd):
    h, w, b, th, tw, labels = _setup(seed=4)
    kw = dict(kd=kd, beta=0.4, alpha=0.3, ce_weight=0.5, n_tokens=10, chunk_size=4)
    dense = _run(chunked_distill_loss, h, w, b, th @ tw.T, labels, loss_temperature=1.5, **kw)
    sparse = _run(chunked_distill_loss, h, w, b, sparse_from_logits(th @ tw.T, V, 1.5), labels,
                  loss_temperature=None, **kw)  # None: the targets' recorded temperature
    _assert_same(sparse, dense, 1e-10)

"""CE folded into the fused cross-tokenizer pass (xtok_loss's ``ce_weight`` / ``ce_stats``, the train loop's one
pass over the student head): the folded loss equals the cross-tokenizer loss plus ``λ ·`` the student's CE over every
label position, in value and gradients, for every method and teacher form, with uneven row weights, under bf16
autocast, at τ = 1 and τ = 2 (CE stays at τ = 1); and a training run logs the same CE and KD either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillery.targets import TeacherTargets, sparse_from_logits
from distillery.xtok import StudentHead, xtok_loss
from tiny import corpus_text
from xtok_tokenizers import random_head_pair

LAM = 0.7


@pytest.fixture(scope="module")
def pair():
    """As tests/test_xtok_fused.py: 1-1, 1-n and n-1 spans, a student head with 3 padded rows and a bias."""
    return random_head_pair(corpus_text(20_000)[10_000:10_500] + " 😀 naïve", 24, 16, 0.4, 0.5)


def _teacher(pair, form, tau=1.0):
    al, vmap, t_ids, s_ids, h_t, w_t, *_ = pair
    logits = h_t @ w_t[:vmap.teacher_vocab].t()
    return {"lazy": TeacherTargets(hidden=h_t, lm_head_weight=w_t, vocab_size=vmap.teacher_vocab),
            "logits": TeacherTargets(logits=logits), "sparse": sparse_from_logits(logits, 32, tau)}[form]


def _run(pair, teacher, method, *, fold, weights=None, dtype=torch.float64, tau=1.0, autocast=False):
    """(per-token values, CE stats, grads of Σ w·values [+ λ·Σ w·CE when not folded]) w.r.t. hidden, weight, bias."""
    al, vmap, t_ids, s_ids, *_, hidden, w_s, b_s = pair
    h, w, b = (x.to(dtype).clone().requires_grad_(True) for x in (hidden, w_s, b_s))
    labels = s_ids[:, 1:]
    stats: dict = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = xtok_loss(StudentHead(h, w, b), teacher, al, vmap, student_labels=labels, teacher_labels=t_ids[:, 1:],
                        method=method, chunk_size=7, loss_temperature=tau,
                        ce_weight=LAM if fold else 0.0, ce_stats=stats if fold else None)
    wt = torch.ones_like(got) if weights is None else weights.to(got.dtype)
    total = (got * wt).sum()
    if not fold:  # the student's CE at every label position, by autograd over the full logits
        logits = h @ w[:vmap.student_vocab].t() + b[:vmap.student_vocab]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                             ignore_index=-100).reshape(labels.shape)
        stats = {"ce_sum": float(ce.detach().sum())}
        total = total + LAM * (ce * wt).sum()
    return got.detach(), stats, torch.autograd.grad(total, (h, w, b))


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("method,form", [("exact_kl", "lazy"), ("exact_kl", "logits"), ("exact_kl", "sparse"),
                                         ("uld", "lazy"), ("gold", "logits")])
def test_folded_ce_is_the_loss_plus_lambda_ce(pair, method, form, tau):
    """At τ = 2 the term is at τ and CE at τ = 1 (the reference's CE is on the raw logits)."""
    teacher = _teacher(pair, form, tau)
    labels = pair[3][:, 1:]
    kd, separate, g_ref = _run(pair, teacher, method, fold=False, tau=tau)
    folded, stats, g_got = _run(pair, teacher, method, fold=True, tau=tau)
    assert separate["ce_sum"] > 10.0  # a real CE over real positions
    assert stats["ce_sum"] == pytest.approx(separate["ce_sum"], rel=1e-9)
    assert sorted(stats["rows"].tolist()) == (labels.reshape(-1) != -100).nonzero().squeeze(1).tolist()
    assert float(folded.sum()) == pytest.approx(float(kd.sum()) + LAM * separate["ce_sum"], rel=1e-9)
    assert float(folded[labels == -100].abs().sum()) == 0.0  # no label: nothing
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert g_got[1][pair[1].student_vocab:].abs().sum() == 0  # padded head rows learn nothing
    weights = torch.rand(kd.shape, generator=torch.Generator().manual_seed(3))  # uneven: backward recomputes
    _, _, g_ref_w = _run(pair, teacher, method, fold=False, weights=weights, tau=tau)
    _, _, g_got_w = _run(pair, teacher, method, fold=True, weights=weights, tau=tau)
    for a, b in zip(g_got_w, g_ref_w):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_folded_ce_under_bf16_autocast_is_close_to_fp32(pair):
    """bf16 head matmuls (losses.chunked.head_grads_ adding reordered blocks straight into vocabulary order)."""
    teacher = _teacher(pair, "lazy")
    _, stats32, g32 = _run(pair, teacher, "exact_kl", fold=True, dtype=torch.float32)
    _, stats16, g16 = _run(pair, teacher, "exact_kl", fold=True, dtype=torch.float32, autocast=True)
    assert stats16["ce_sum"] == pytest.approx(stats32["ce_sum"], rel=2e-2)
    for a, b in zip(g16, g32):
        assert float((a - b).norm() / b.norm()) < 3e-2


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_a_training_run_logs_the_same_ce_and_kd_with_the_fold(tmp_path, monkeypatch, tau):
    """The train loop folds CE into the cross-tokenizer pass; with the fold switched off (CrossTokenizer.loss never
    given ce_stats: the chunked CE pass runs as before) the same run logs the same losses (fp32: to rounding)."""
    from distillery.config import load_config
    from distillery.student_tokenizer import train_bpe
    from distillery.xtok import batch
    from helpers_run import make_corpus, run_metrics, write_recipe

    tok = train_bpe([make_corpus(tmp_path).read_text()], 700)
    tok.save_pretrained(str(tmp_path / "tok"))
    from distillery import train

    plain, chunked = batch.CrossTokenizer.loss, train.chunked_distill_loss
    calls = {"fold": 0, "separate": 0}

    def records(out, fold: bool):
        def counted(*a, **k):
            calls[out] += 1
            return chunked(*a, **k)
        monkeypatch.setattr(train, "chunked_distill_loss", counted)
        if not fold:
            monkeypatch.setattr(batch.CrossTokenizer, "loss",
                                lambda self, *a, ce_weight=0.0, ce_stats=None, **k: plain(self, *a, **k))
        train.distill(load_config(write_recipe(
            tmp_path, tmp_path / out, student={"tokenizer": str(tmp_path / "tok")},
            data={"max_train_blocks": 24, "max_val_blocks": 4}, loss={"ce_weight": 0.5, "loss_temperature": tau},
            train={"max_steps": 4, "save_every": 0, "eval_every": 0, "mixed_precision": "no"})))
        monkeypatch.undo()
        return [m for m in run_metrics(tmp_path / out) if "tok_s" in m]

    folded, separate = records("fold", True), records("separate", False)
    assert len(folded) == len(separate) == 4
    assert calls == {"fold": 0, "separate": 4}  # folded: no second pass over the student head
    for a, b in zip(folded, separate):
        assert a["ce"] > 1.0 and a["kd"] > 0.01
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), key


def test_the_span_term_reads_the_folded_pass(pair, monkeypatch):
    """With CE folded in, the span term takes each span row's log q(label) from the same fused pass (its gradient
    added in that pass's backward, ``fused.label_grads_``), not from a second, checkpointed pass over the head."""
    from distillery.xtok import fused, losses

    def second_pass(*a, **k):
        raise AssertionError("student_label_logprobs called: a second pass over the student head")
    calls = []
    label_grads = fused.label_grads_
    monkeypatch.setattr(losses, "student_label_logprobs", second_pass)
    monkeypatch.setattr(fused, "label_grads_", lambda *a, **k: calls.append(1) or label_grads(*a, **k))
    folded, stats, grads = _run(pair, _teacher(pair, "lazy"), "exact_kl", fold=True)
    assert calls == [1] and stats["ce_sum"] > 10.0
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_label_grads_match_autograd(low):
    """``fused.label_grads_`` against autograd of ``Σ g_r log softmax(z_r / τ)[y_r]``: exact in fp64; with bf16
    head matmuls over more than one ``HEAD_BLOCK`` of vocabulary and a row count that is no multiple of 8, close."""
    from distillery.losses.chunked import HEAD_BLOCK
    from distillery.xtok.fused import FusedPlan, label_grads_

    gen = torch.Generator().manual_seed(5)
    n, hid, v, tau = 13, 16, HEAD_BLOCK + 808, 2.0
    dtype = torch.float64 if low is None else torch.float32
    h, w, b = (torch.randn(*s, generator=gen, dtype=dtype) for s in ((n, hid), (v + 3, hid), (v + 3,)))
    labels = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen, dtype=dtype)
    g[[2, 7]] = 0.0  # rows with no gradient are skipped
    plan = FusedPlan("exact_kl", tau, v, 0, 5, head_dtype=low, ce_labels=labels)
    grads = [torch.zeros_like(h), torch.zeros_like(w), torch.zeros_like(b)]
    label_grads_(plan, h, w, b, g, grads)
    hr, wr, br = (x.clone().requires_grad_(True) for x in (h, w, b))
    lq = torch.log_softmax((hr @ wr[:v].t() + br[:v]) / tau, dim=1)
    (lq.gather(1, labels.unsqueeze(1)).squeeze(1) * g).sum().backward()
    for got, ref in zip(grads, (hr.grad, wr.grad, br.grad)):
        if low is None:
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
        else:
            assert float((got - ref).norm() / ref.norm()) < 2e-2
    assert grads[1][v:].abs().sum() == 0  # padded head rows learn nothing

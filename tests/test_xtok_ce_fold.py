"""CE folded into the fused cross-tokenizer pass (xtok_loss's ``ce_weight`` / ``ce_stats``, the train loop's one
pass over the student head): the folded loss equals the cross-tokenizer loss plus ``λ ·`` the student's CE over every
label position, in value and gradients, for every method and teacher form, with uneven row weights, under bf16
autocast; τ ≠ 1 does not fold; and a training run logs the same CE and KD either way."""

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


@pytest.mark.parametrize("method,form", [("exact_kl", "lazy"), ("exact_kl", "logits"), ("exact_kl", "sparse"),
                                         ("uld", "lazy"), ("gold", "logits")])
def test_folded_ce_is_the_loss_plus_lambda_ce(pair, method, form):
    teacher = _teacher(pair, form)
    labels = pair[3][:, 1:]
    kd, separate, g_ref = _run(pair, teacher, method, fold=False)
    folded, stats, g_got = _run(pair, teacher, method, fold=True)
    assert separate["ce_sum"] > 10.0  # a real CE over real positions
    assert stats["ce_sum"] == pytest.approx(separate["ce_sum"], rel=1e-9)
    assert sorted(stats["rows"].tolist()) == (labels.reshape(-1) != -100).nonzero().squeeze(1).tolist()
    assert float(folded.sum()) == pytest.approx(float(kd.sum()) + LAM * separate["ce_sum"], rel=1e-9)
    assert float(folded[labels == -100].abs().sum()) == 0.0  # no label: nothing
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert g_got[1][pair[1].student_vocab:].abs().sum() == 0  # padded head rows learn nothing
    weights = torch.rand(kd.shape, generator=torch.Generator().manual_seed(3))  # uneven: backward recomputes
    _, _, g_ref_w = _run(pair, teacher, method, fold=False, weights=weights)
    _, _, g_got_w = _run(pair, teacher, method, fold=True, weights=weights)
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


def test_no_fold_at_another_temperature(pair):
    """CE is at τ = 1: with τ ≠ 1 nothing is folded and the caller computes CE itself (ce_stats stays empty)."""
    teacher = _teacher(pair, "lazy")
    al, vmap, t_ids, s_ids, *_, hidden, w_s, b_s = pair
    stats: dict = {}
    plain = xtok_loss(StudentHead(hidden, w_s, b_s), teacher, al, vmap, student_labels=s_ids[:, 1:],
                      teacher_labels=t_ids[:, 1:], loss_temperature=2.0, chunk_size=7)
    asked = xtok_loss(StudentHead(hidden, w_s, b_s), teacher, al, vmap, student_labels=s_ids[:, 1:],
                      teacher_labels=t_ids[:, 1:], loss_temperature=2.0, chunk_size=7, ce_weight=LAM, ce_stats=stats)
    assert stats == {}
    torch.testing.assert_close(asked, plain, atol=0, rtol=0)


def test_a_training_run_logs_the_same_ce_and_kd_with_the_fold(tmp_path, monkeypatch):
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
            data={"max_train_blocks": 24, "max_val_blocks": 4}, loss={"ce_weight": 0.5},
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

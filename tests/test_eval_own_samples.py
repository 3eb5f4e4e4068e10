"""`evaluate_own_samples`: fidelity measured on the student's own continuations (only the generated tokens)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distillery.config import GenerationConfig
from distillery.evaluate import evaluate, evaluate_own_samples
from distillery.onpolicy import on_policy_batch
from distillery.teachers.hf import HFTeacher as Teacher
from tiny import tiny_llama

TOK = SimpleNamespace(pad_token_id=3, eos_token_id=0, get_vocab=lambda: {})
CFG = GenerationConfig(max_new_tokens=7, sample_temperature=1.0, prompt_tokens=5)


def blocks(n=3, b=2, t=16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 512, (b, t), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], dim=1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def teacher_of(model):
    return Teacher(model=model.eval(), tokenizer=TOK, name="tiny", source="tiny", device=torch.device("cpu"))


def test_a_student_equal_to_its_teacher_scores_zero_kl_on_its_own_samples():
    model = tiny_llama(layers=2, seed=3)
    m = evaluate_own_samples(teacher_of(model), model, blocks(), TOK, CFG, vocab_size=512)
    assert m["kl_teacher_student"] == pytest.approx(0.0, abs=1e-5) and m["top1_agreement"] == 1.0
    assert m["teacher_perplexity"] == pytest.approx(m["student_perplexity"], rel=1e-5)
    assert m["tokens"] == 3 * 2 * 7  # no EOS among the draws' targets here: every generated token, nothing else


def test_own_samples_metrics_are_those_of_the_sampled_batches():
    teacher, student = tiny_llama(layers=2, seed=3), tiny_llama(layers=1, seed=8)
    t = teacher_of(teacher)
    got = evaluate_own_samples(t, student, blocks(), TOK, CFG, seed=5, vocab_size=512, max_batches=2)
    g = torch.Generator().manual_seed(5)  # the same draws, made by hand
    sampled = [on_policy_batch(student, b, TOK, CFG, generator=g, vocab_size=512) for b in blocks()[:2]]
    ref = evaluate(t, student, sampled, vocab_size=512)
    assert got["kl_teacher_student"] > 0.01
    for k in ("kl_teacher_student", "top1_agreement", "teacher_perplexity", "student_perplexity", "tokens"):
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k
    again = evaluate_own_samples(t, student, blocks(), TOK, CFG, seed=5, vocab_size=512, max_batches=2)
    assert again["kl_teacher_student"] == got["kl_teacher_student"]  # seeded: repeatable

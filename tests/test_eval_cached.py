"""`distillery.evaluate` against a cached teacher: the sampled tail's KL tracks the live KL, the bucket's is lower."""

from __future__ import annotations

import torch

from distillery.cache import write_cache
from distillery.teachers import CachedTeacher
from distillery.evaluate import evaluate
from distillery.targets import TeacherTargets
from test_cache_support import BlockDataset, TinyTeacher, collate
from tiny import tiny_llama

V, T = 512, 32
INFO = {"teacher": {"name": "tiny", "weights_hash": "w0"}, "tokenizer_hash": "tok0"}


class _Live:
    """The same tiny teacher, live: dense logits for every batch."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def targets(self, batch: dict, vocab_size: int | None = None) -> TeacherTargets:
        return TeacherTargets(logits=self.model(batch["input_ids"]), mask=batch["labels"] != -100, vocab_size=vocab_size)


def test_cached_teacher_kl_uses_the_sampled_tail(tmp_path):
    ds = BlockDataset(96, T, V, seed=4)  # ~3,000 target positions (some prompts and a block end masked)
    teacher = TinyTeacher(V, scale=3.0).eval()
    write_cache(lambda b: teacher(b["input_ids"]), ds, tmp_path / "c", k=16, tail_samples=16, tail_seed=3,
                loss_temperature=1.0, manifest_info=INFO, shard_blocks=32, batch_size=16, progress=False)
    student = tiny_llama(vocab_size=V, seed=5)

    def run(t):
        batches = (collate(ds, range(i, i + 16)) for i in range(0, len(ds), 16))
        return evaluate(t, student, batches, vocab_size=V, chunk_rows=256)

    live = run(_Live(teacher))
    sampled = run(CachedTeacher(tmp_path / "c"))
    bucket = run(CachedTeacher(tmp_path / "c", tail="bucket"))

    kl_live = live["kl_teacher_student"]
    assert live["tokens"] == sampled["tokens"] == bucket["tokens"] > 2500
    assert abs(sampled["kl_teacher_student"] - kl_live) <= 0.03 * kl_live, (sampled, live)
    assert bucket["kl_teacher_student"] < 0.9 * kl_live, (bucket, live)  # the bucket's lower bound, far off
    # the tail's draws change the KL only: top-1 agreement and the student's perplexity are the same
    assert sampled["top1_agreement"] == bucket["top1_agreement"]
    assert abs(sampled["top1_agreement"] - live["top1_agreement"]) <= 0.01
    assert sampled["student_perplexity"] == bucket["student_perplexity"]
    assert abs(sampled["student_perplexity"] - live["student_perplexity"]) <= 1e-4 * live["student_perplexity"]
    assert sampled["teacher_perplexity"] is None and live["teacher_perplexity"] > 1

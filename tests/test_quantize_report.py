"""quantize's report: a tied embedding is counted once in bytes_fp32; --teacher takes a teacher source like every
other verb (a folder here; smollm2 and .gguf resolve through teachers.hf.resolve_source)."""

from __future__ import annotations

import pytest

from distillery.errors import DistilleryError
from distillery.quantize import quantize_model
from distillery.students import count_parameters
from tiny import tiny_llama, tiny_tokenizer


def test_tied_embedding_counted_once_and_teacher_source(tmp_path):
    student = tiny_llama(vocab_size=512, hidden=64, layers=2, tie=True, seed=2)
    student.save_pretrained(tmp_path / "s")
    tiny_tokenizer(512).save_pretrained(tmp_path / "s")
    tiny_llama(vocab_size=512, hidden=64, layers=2, seed=5).save_pretrained(tmp_path / "t")
    report = quantize_model(tmp_path / "s", bits=8, out_dir=tmp_path / "q", eval_tokens=64, teacher_dir=str(tmp_path / "t"))
    assert report["bytes_fp32"] == 4 * count_parameters(student)  # the tied LM head is the embedding's storage
    assert report["kl_teacher_student_fp32"] > 0 and report["kl_teacher_student_quant"] > 0
    with pytest.raises(DistilleryError, match="is neither a model folder, a .gguf file nor a hub id"):
        quantize_model(tmp_path / "s", bits=8, out_dir=tmp_path / "q2", eval_tokens=64, teacher_dir=str(tmp_path / "no" / "where"))

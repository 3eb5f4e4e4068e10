"""Live teacher: frozen, no grad, lazy dense targets equal full logits, clear errors for bad sources."""

import pytest
import torch

from distillery.errors import DistilleryError
from distillery.teachers import load_teacher
from tiny import tiny_llama, tiny_tokenizer


@pytest.fixture()
def teacher_dir(tmp_path):
    tiny_llama(layers=2, seed=1).save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    return tmp_path / "t"


def test_folder_teacher_is_frozen_and_lazy_targets_match_logits(teacher_dir):
    t = load_teacher(str(teacher_dir))
    assert not t.model.training
    assert all(not p.requires_grad for p in t.model.parameters())
    ids = torch.randint(0, 512, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tt = t.targets(batch, vocab_size=512)
    assert tt.hidden is not None and tt.hidden.shape == (2, 12, 64) and not tt.hidden.requires_grad
    full = t.model(ids).logits.reshape(-1, 512)
    torch.testing.assert_close(tt.dense_logits(), full, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([0, 5, 23])
    torch.testing.assert_close(tt.dense_logits(rows), full[rows], rtol=1e-5, atol=1e-5)
    assert t.weights_hash() == load_teacher(str(teacher_dir)).weights_hash()


@pytest.mark.parametrize("source, needle", [
    ("/definitely/not/here.gguf", "does not exist"),
    ("./no/such/folder", "neither a model folder"),
])
def test_bad_sources(source, needle):
    with pytest.raises(DistilleryError, match=needle):
        load_teacher(source)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistilleryError, match="no config.json"):
        load_teacher(str(tmp_path / "empty"))


@pytest.mark.slow
def test_smollm2_gguf_teacher_converts_once_and_runs():
    t = load_teacher("smollm2")
    assert t.model.config.vocab_size == 49152 and len(t.tokenizer) == 49152
    ids = t.tokenizer("To be, or not to be, that is the question", return_tensors="pt").input_ids
    logits = t.model(ids).logits
    # the teacher knows Hamlet: the next token after 'that is the' is ' question'
    assert t.tokenizer.decode(logits[0, -2].argmax()) == " question"

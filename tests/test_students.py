"""Students: built from a config over the teacher's basics, plain HF folders, vocabulary check."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.config import StudentConfig
from distillery.errors import DistilleryError
from distillery.students import build_student, check_vocab, count_parameters
from tiny import tiny_llama, tiny_tokenizer


def test_build_from_config_inherits_vocab_and_saves(tmp_path):
    teacher = tiny_llama(hidden=64, layers=2)
    cfg = StudentConfig(model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1})
    s = build_student(cfg, teacher)
    assert s.config.vocab_size == teacher.config.vocab_size
    assert s.config.model_type == "llama" and s.config.head_dim == 16
    assert count_parameters(s) < count_parameters(teacher)
    s.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    x = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(back(x).logits, s.eval()(x).logits)


def test_pretrained_and_errors(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "p")
    s = build_student(StudentConfig(init="pretrained", pretrained=str(tmp_path / "p")))
    assert s.training
    with pytest.raises(DistilleryError, match="not a model folder"):
        build_student(StudentConfig(init="pretrained", pretrained=str(tmp_path / "nope")))
    with pytest.raises(DistilleryError, match="student.pretrained"):
        build_student(StudentConfig(init="pretrained"))
    with pytest.raises(DistilleryError, match="not supported"):
        # the recipe refuses it first (config.check_student_model); the builder refuses it again for API callers
        build_student(StudentConfig.model_construct(model={"model_type": "gpt2"}), tiny_llama())
    with pytest.raises(DistilleryError, match="multiple of num_key_value_heads"):
        build_student(StudentConfig(model={"num_attention_heads": 4, "num_key_value_heads": 3, "hidden_size": 48}),
                      tiny_llama())


def test_vocab_check_padded_ok_and_mismatch_fails():
    tok = tiny_tokenizer(512)
    # padded embedding tables (e.g. 151,936 vs 152,064) are fine when the tokenizers agree
    assert check_vocab(tok, tok, 520, 512) == 512
    other = tiny_tokenizer(600)
    with pytest.raises(DistilleryError, match="tokenizer mismatch"):
        check_vocab(tok, other, 512, 600)
    with pytest.raises(DistilleryError, match="student output layer has 500 logits"):
        check_vocab(tok, tok, 512, 500)

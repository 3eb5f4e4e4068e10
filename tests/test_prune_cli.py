"""`distillery prune` verb: argparse registration, teacher folder in, plain HF folder out."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillery.errors import DistilleryError
from distillery.prune.cli import add_prune_parser, calibration_batches, prune_main
from tiny import corpus_text, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    tiny_llama(layers=3, hidden=64, heads=4, kv_heads=2, ffn=128).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_prunes_a_teacher_folder(teacher_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(corpus_text(20_000))
    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_prune_parser(sub)
    out = tmp_path / "student"
    args = parser.parse_args([str(teacher_dir), str(out), "--layers", "2", "--hidden", "48", "--ffn", "64",
                              "--heads", "2", "--data", str(text), "--seq-len", "32", "--batch-size", "2",
                              "--calibration-batches", "2", "--device", "cpu"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"] and len(printed["layers"]) == 2 and printed["hidden"] == 48
    report = json.loads((out / "pruning.json").read_text())
    assert report["calibration_tokens"] == 2 * 2 * 32 and len(report["depth_scores"]) == 3
    assert report["student_parameters"] < report["teacher_parameters"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim) == (2, 48, 64, 2, 16)
    ids = tok("To be, or not to be", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_prune_main_refuses_existing_output_and_bad_data(teacher_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(DistilleryError, match="already exists"):
        prune_main(str(teacher_dir), out, layers=2)
    with pytest.raises(DistilleryError, match="does not exist"):
        prune_main(str(teacher_dir), tmp_path / "new", layers=2, data=[str(tmp_path / "missing.txt")])


def test_calibration_batches_shapes():
    tok = tiny_tokenizer()
    batches = calibration_batches(["demo:milton"], tok, seq_len=16, batch_size=3, n_batches=2)
    assert len(batches) == 2
    for b in batches:
        assert b["input_ids"].shape == (3, 16) and b["attention_mask"].shape == (3, 16)

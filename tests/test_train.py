"""The loop: end to end through the CLI, exact resume, accumulation equivalence, NaN stop."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distillery.cli import main
from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import make_teacher, write_recipe


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_cli_distill_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out)
    assert main(["distill", str(recipe), "train.max_steps=4"]) == 0
    student = out / "student"
    assert (student / "model.safetensors").is_file() and (student / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(student)  # plain transformers, no distillery
    assert model.config.num_hidden_layers == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
    assert any(x.get("split") == "val" for x in lines)
    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["eval", "--teacher", str(make_teacher(tmp_path)), "--student", str(student),
                 "--data", str(tmp_path / "corpus.txt"), "--seq-len", "32", "--max-blocks", "8",
                 "--json", str(js)]) == 0
    metrics = json.loads(js.read_text())
    assert set(metrics) >= {"teacher_perplexity", "student_perplexity", "kl_teacher_student", "top1_agreement", "tokens"}
    assert metrics["tokens"] == 8 * 32 and metrics["kl_teacher_student"] > 0
    assert "own_samples" not in metrics
    assert main(["eval", "--teacher", str(make_teacher(tmp_path)), "--student", str(student),
                 "--data", str(tmp_path / "corpus.txt"), "--seq-len", "32", "--max-blocks", "8",
                 "--own-samples", "6", "--prompt-tokens", "10", "--json", str(js)]) == 0
    own = json.loads(js.read_text())["own_samples"]
    assert 0 < own["tokens"] <= 8 * 6 and own["max_new_tokens"] == 6 and own["kl_teacher_student"] > 0


def test_kd_reduces_kl(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(write_recipe(tmp_path, out), ["train.max_steps=30", "train.eval_every=0", "train.save_every=0"])
    summary = distill(cfg)
    before = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["kd"]
    assert summary["validation"]["kl_teacher_student"] < 0.8 * before


def test_resume_is_bitwise_identical(tmp_path):
    full = tmp_path / "full"
    distill(load_config(write_recipe(tmp_path, full)))
    part = tmp_path / "part"
    distill(load_config(write_recipe(tmp_path, part)))
    # simulate a crash after the step-3 checkpoint: remove everything written later
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "student")
    distill(load_config(write_recipe(tmp_path, part)), resume=True)
    a, b = _weights(full / "student"), _weights(part / "student")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (full / "metrics.jsonl").read_text().splitlines()
    lb = (part / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(x).items() if k not in ("tok_s", "step_s")} for x in ls]
    assert strip(la) == strip(lb)


def test_refuses_to_overwrite_without_resume(tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out)
    distill(load_config(recipe, ["train.max_steps=3"]))
    with pytest.raises(DistilleryError, match="--resume"):
        distill(load_config(recipe, ["train.max_steps=3"]))


def test_accumulation_matches_one_big_batch(tmp_path):
    one = tmp_path / "one"
    acc = tmp_path / "acc"
    common = ["train.max_steps=1", "train.eval_every=0", "train.warmup_steps=0", "train.max_grad_norm=0",
              "loss.ce_weight=0.5"]
    distill(load_config(write_recipe(tmp_path, one), common + ["train.micro_batch_size=8", "train.grad_accum=1"]))
    distill(load_config(write_recipe(tmp_path, acc), common + ["train.micro_batch_size=2", "train.grad_accum=4"]))
    a, b = _weights(one / "student"), _weights(acc / "student")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out)
    bad = tmp_path / "nan_teacher"
    shutil.copytree(make_teacher(tmp_path), bad)
    model = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    with pytest.raises(DistilleryError, match=r"step 0: loss is nan"):
        distill(load_config(recipe, [f"teacher.source={bad}"]))
    assert not (out / "student").exists()


def test_on_policy_fraction_zero_is_exactly_supervised_and_one_runs(tmp_path):
    sup, zero, onp = tmp_path / "sup", tmp_path / "zero", tmp_path / "onp"
    common = ["train.max_steps=2", "train.eval_every=0", "train.save_every=0"]
    distill(load_config(write_recipe(tmp_path, sup), common))
    distill(load_config(write_recipe(tmp_path, zero), common + ["generation.on_policy_fraction=0.0"]))
    a, b = _weights(sup / "student"), _weights(zero / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = distill(load_config(write_recipe(tmp_path, onp), common + [
        "generation.on_policy_fraction=1.0", "generation.max_new_tokens=8", "generation.prompt_tokens=8"]))
    lines = [json.loads(x) for x in (onp / "metrics.jsonl").read_text().splitlines() if "kd" in x]
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(x["kd"])) for x in lines)

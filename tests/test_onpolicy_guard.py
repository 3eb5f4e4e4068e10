"""On-policy schedule and the collapse guard: ``generation.on_policy_start`` and ``generation.collapse_guard``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.onpolicy import COLLAPSE_NLL, COLLAPSE_STEPS, CollapseGuard
from distillery.train import distill
from helpers_run import write_recipe
from tiny import tiny_llama

ON = ["generation.on_policy_fraction=1.0", "generation.max_new_tokens=8", "generation.prompt_tokens=8",
      "train.eval_every=0", "train.save_every=0"]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kd"' in x]


def collapsed_student(folder, token: int = 7):
    """A student of the recipe's shape that is certain of one token after any prefix: the residual stream is a
    constant embedding (attention and MLP outputs zeroed), read by a head that only sees that constant. Its
    samples repeat ``token``: what the JSD on-policy run of benchmarks/quality.py collapsed to."""
    m = tiny_llama(vocab_size=512, hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, seed=3)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight.zero_()
        m.model.embed_tokens.weight[:, 0] = 1.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[token, 0] = 50.0  # logit 50 * sqrt(32) = 283 after the RMS norm: -log q underflows to 0
    m.save_pretrained(folder)
    return folder


def test_guard_counts_consecutive_certain_steps_and_resets():
    g = CollapseGuard()
    low = COLLAPSE_NLL / 10
    assert [g.update(s, low) for s in range(COLLAPSE_STEPS - 1)] == [None] * (COLLAPSE_STEPS - 1)
    assert g.update(10, 2.5) is None  # a healthy step (entropy of natural text: nats) resets the count
    msgs = [g.update(11 + i, low) for i in range(COLLAPSE_STEPS)]
    assert msgs[:-1] == [None] * (COLLAPSE_STEPS - 1)
    assert "collapsed" in msgs[-1] and "on_policy_start" in msgs[-1] and f"step {10 + COLLAPSE_STEPS} " in msgs[-1]
    assert "\n" not in msgs[-1]


def test_collapsed_student_stops_with_a_one_line_error(tmp_path):
    student = collapsed_student(tmp_path / "collapsed")
    out = tmp_path / "run"
    cfg = load_config(write_recipe(tmp_path, out), ON + ["student.init=pretrained", f"student.pretrained={student}",
                                                         "train.max_steps=6"])
    with pytest.raises(DistilleryError, match=rf"step {COLLAPSE_STEPS}: the student's on-policy samples have collapsed"):
        distill(cfg)
    recs = _records(out)
    assert len(recs) == COLLAPSE_STEPS and all(r["on_policy"] and r["ce"] < COLLAPSE_NLL for r in recs)
    assert not (out / "student").exists()


def test_collapse_guard_warn_runs_on_and_says_so_once(tmp_path, capsys):
    student = collapsed_student(tmp_path / "collapsed")
    out = tmp_path / "run"
    cfg = load_config(write_recipe(tmp_path, out), ON + ["student.init=pretrained", f"student.pretrained={student}",
                                                         "train.max_steps=5", "generation.collapse_guard=warn"])
    assert distill(cfg)["steps"] == 5
    assert capsys.readouterr().err.count("samples have collapsed") == 1


def test_a_healthy_student_is_not_stopped(tmp_path):
    out = tmp_path / "run"
    distill(load_config(write_recipe(tmp_path, out), ON + ["train.max_steps=4"]))
    recs = _records(out)
    assert all(r["on_policy"] for r in recs) and min(r["ce"] for r in recs) > 1.0  # random init: ~ln(512) nats


def test_on_policy_start_keeps_the_first_steps_supervised(tmp_path):
    sup, late = tmp_path / "sup", tmp_path / "late"
    common = ["train.eval_every=0", "train.max_steps=4", "train.save_every=2"]
    distill(load_config(write_recipe(tmp_path, sup), common))
    distill(load_config(write_recipe(tmp_path, late), ON + ["train.max_steps=4", "train.save_every=2",
                                                            "generation.on_policy_start=2"]))
    assert [r["on_policy"] for r in _records(late)] == [False, False, True, True]
    # before on_policy_start the run is the supervised one exactly: equal weights after step 2
    a = load_file(str(sup / "checkpoints" / "step-00000002" / "model.safetensors"))
    b = load_file(str(late / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Runs that protect themselves (issue 17): resume falls back past a damaged checkpoint, the run identity,
divergence stops, strict JSON, the output-folder lock held by another process, the long-step note."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from distillery.checkpoint import check_validation, check_weights
from distillery.run_folder import RESUMABLE_CHANGES, identity_state, run_fingerprint, run_identity
from distillery.cli import main
from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.evaluate import strict_json
from distillery.locks import output_lock
from helpers_run import student_weights, write_recipe

TRAIN = {"max_steps": 4, "save_every": 2, "eval_every": 0, "keep_checkpoints": 2, "warmup_steps": 1}


def test_resume_skips_a_damaged_newest_checkpoint_and_matches_an_uninterrupted_run(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["distill", str(write_recipe(tmp_path, full, train=TRAIN))]) == 0
    recipe = write_recipe(tmp_path, part, train=TRAIN)
    assert main(["distill", str(recipe)]) == 0
    state = json.loads((part / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["fingerprint"] == run_fingerprint(load_config(recipe)) and state["settings"]["loss.kd"] == "forward_kl"
    newest = part / "checkpoints" / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    assert main(["distill", str(recipe), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step-00000004: model.safetensors has 1000 bytes" in err
    assert "resuming from step-00000002" in err
    a, b = student_weights(full), student_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_identity_ignores_what_a_resume_may_change_and_names_the_rest(tmp_path):
    base = load_config(None, ["train.max_steps=10"])
    longer = load_config(None, ["train.max_steps=99", "train.eval_every=7", "train.output_dir=elsewhere",
                                "train.micro_batch_size=2"])
    assert run_fingerprint(base) == run_fingerprint(longer)
    assert run_fingerprint(base) != run_fingerprint(load_config(None, ["loss.kd=jsd"]))
    ident = run_identity(base)
    assert ident["loss.kd"] == "forward_kl" and ident["train.lr"] == 1e-3 and ident["student.model"] == {}
    assert not RESUMABLE_CHANGES & set(ident)
    assert identity_state(base)["fingerprint"] == run_fingerprint(base)


def test_a_resume_may_lengthen_the_run(tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, out, train={**TRAIN, "max_steps": 2})
    assert main(["distill", str(recipe)]) == 0
    assert main(["distill", str(recipe), "--resume", "train.max_steps=3", "train.save_every=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_divergence_checks_name_the_tensor_and_the_last_checkpoint(tmp_path):
    layer = torch.nn.Linear(2, 2)
    check_weights(layer, 3, tmp_path)  # healthy: no error
    with torch.no_grad():
        layer.weight[0, 0] = 2e4
    with pytest.raises(DistilleryError, match=r"step 3: the student diverged \(weight holds \|w\| = 2e\+04\).*last good checkpoint: none"):
        check_weights(layer, 3, tmp_path)
    with pytest.raises(DistilleryError, match=r"bias holds non-finite values"):
        check_weights({"bias": torch.tensor([0.0, math.nan])}, 5, tmp_path)
    check_validation({"kl_teacher_student": 0.5, "tokens": 10}, 2, tmp_path)
    with pytest.raises(DistilleryError, match=r"step 2: validation student_perplexity=inf"):
        check_validation({"student_perplexity": math.inf, "tokens": 10}, 2, tmp_path)


def test_json_output_is_strict():
    text = strict_json({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    assert "NaN" not in text and "Infinity" not in text


def test_the_lock_names_the_process_that_holds_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.write(f'{os.getpid()} host-x t\\n'); f.flush(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DistilleryError, match=rf"being written by another run \(process {holder.pid} on host-x"):
            with output_lock(tmp_path, "train.output_dir"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path, "train.output_dir"):  # the OS released it with the process
        assert (tmp_path / ".lock").read_text().split()[0] == str(__import__("os").getpid())


def test_a_long_step_is_announced(tmp_path, capsys):
    from distillery.preflight import MANY_MICRO_BATCHES, check_recipe

    check_recipe(load_config(None, [f"train.grad_accum={MANY_MICRO_BATCHES * 200}", "train.output_dir=" + str(tmp_path)]))
    err = capsys.readouterr().err
    assert f"note: train.grad_accum={MANY_MICRO_BATCHES * 200}: every optimizer step runs" in err
    check_recipe(load_config(None, ["train.grad_accum=4", "train.output_dir=" + str(tmp_path)]))
    assert capsys.readouterr().err == ""


def test_a_fresh_run_never_writes_into_an_earlier_run_or_a_foreign_folder(tmp_path, capsys):
    """No run clobbers another: a run cut short before its first checkpoint (config.yaml and metrics.jsonl, no
    checkpoint) used to get a second run's records appended to its metrics.jsonl, so its curve mixed two runs; a
    folder of the user's own files got a run written among them."""
    import shutil

    out = tmp_path / "run"
    train = {**TRAIN, "max_steps": 2, "save_every": 0}
    recipe = write_recipe(tmp_path, out, train=train)
    assert main(["distill", str(recipe)]) == 0
    for name in ("checkpoints", "student", "summary.json"):  # as if killed at step 2, before any checkpoint
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run (config.yaml, metrics.jsonl) and no checkpoint" in err and "--resume" in err
    assert "\n" not in err and (out / "metrics.jsonl").read_text() == before  # one line; nothing touched
    # --resume with nothing to resume runs it again from step 0, its records replaced rather than appended to
    assert main(["distill", str(recipe), "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"tok_s"' in x]
    assert steps == [1, 2]

    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for flags in ([], ["--resume"]):
        assert main(["distill", str(write_recipe(tmp_path, mine, train=train)), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds files that are not a run's (notes.txt)" in err and "\n" not in err
    assert sorted(p.name for p in mine.iterdir() if not p.name.startswith(".")) == ["notes.txt"]

"""Data parallel on CPU: two processes (``accelerate launch``, DDP over gloo) against one process.

The two-process run uses ``micro_batch_size=4`` per rank, the one-process run ``8``: the same global
batches (``data.BlockSampler``), so the loss curve, the gradient norm (which checks the
``loss × world`` scaling under DDP's gradient averaging and the all-reduced token count) and the
final weights must agree up to float summation order. Tolerances: relative 1e-5 (absolute 1e-6 for
the small KD term) on every logged loss and gradient norm, absolute 1e-5 on every weight; measured
differences are printed (``-s``), typically ~1e-7 relative and ~2e-7 on the weights.

The same run then resumes on one process from the two-process checkpoint (the step number is the
data position when micro_batch_size × processes is kept), and a resume that would change the
blocks per step is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import assert_same_training, launch_two, run_metrics, student_weights, write_recipe

REPO = Path(__file__).resolve().parents[1]
DDP_CPU = REPO / "configs" / "accelerate" / "ddp_cpu.yaml"
COMMON = {"max_steps": 6, "save_every": 3, "eval_every": 0, "eval_batches": 1, "warmup_steps": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    two, one = root / "two", root / "one"
    loss = {"ce_weight": 0.5}
    proc = launch_two(DDP_CPU, write_recipe(root, two, loss=loss, train={**COMMON, "micro_batch_size": 4}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"steps": 6') == 1  # only the main process prints the summary
    distill(load_config(write_recipe(root, one, loss=loss, train={**COMMON, "micro_batch_size": 8})))
    return root, two, one


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    _, two, one = runs
    assert_same_training(two, one, [1, 2, 3, 4, 5, 6])
    va, vb = run_metrics(two)[-1], run_metrics(one)[-1]
    assert va["split"] == vb["split"] == "val" and va["tokens"] == vb["tokens"]  # the same validation blocks
    assert va["teacher_perplexity"] == pytest.approx(vb["teacher_perplexity"], rel=1e-6)
    state = json.loads((two / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert (state["world_size"], state["global_batch"], state["step"]) == (2, 8, 6)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_resume_on_one_process_from_a_two_process_checkpoint(runs):
    root, two, one = runs
    part = root / "part"
    shutil.copytree(two, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "student")
    recipe = write_recipe(root, part, loss={"ce_weight": 0.5}, train={**COMMON, "micro_batch_size": 4})
    with pytest.raises(DistilleryError, match=r"written with 8 blocks per step, this run takes 4 .*product is 8"):
        distill(load_config(recipe), resume=True)
    distill(load_config(recipe, ["train.micro_batch_size=8"]), resume=True)
    a = [m for m in run_metrics(part) if "loss" in m]
    b = [m for m in run_metrics(one) if "loss" in m]
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["tokens_seen"] == y["tokens_seen"]
    wa, wb = student_weights(part), student_weights(one)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_launch_checks(monkeypatch, capsys):
    """Launcher fallbacks (an FSDP config with one process, `--cpu` = one process) are noted."""
    from types import SimpleNamespace

    from accelerate import DistributedType

    from distillery.train import _check_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    _check_launch(SimpleNamespace(distributed_type=DistributedType.NO, is_main_process=True, num_processes=1))
    err = capsys.readouterr().err
    assert "an FSDP launch config with one process" in err and "starts a single process" in err

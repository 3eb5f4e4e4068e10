"""FSDP2 on CPU: two processes (``accelerate launch`` with configs/accelerate/fsdp.yaml, gloo) against one.

distillery shards the student itself (``distillery.fsdp``): one unit per decoder layer, the embeddings,
final norm and tied LM head in the root unit, whose gathered head the fused loss reads outside the
wrapped forward. With ``micro_batch_size=4`` on each of two ranks and ``8`` on one process the global
batches are the same, so every logged loss and gradient norm, the validation metrics (evaluated on
every rank under FSDP) and the final weights must agree up to float summation order (tolerances as in
test_ddp.py). Checkpoints are whole: an FSDP checkpoint resumes on one process without FSDP, and a
one-process checkpoint (index-keyed optimizer state) resumes under FSDP; both end where the
uninterrupted run ends.
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
from helpers_run import assert_same_training, launch_two, run_metrics, write_recipe

REPO = Path(__file__).resolve().parents[1]
FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"
TRAIN = {"max_steps": 6, "save_every": 3, "eval_every": 3, "eval_batches": 1, "warmup_steps": 1}
STUDENT = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "tie_word_embeddings": True}}
LOSS = {"ce_weight": 0.5}


def _recipe(root: Path, out: Path, micro: int) -> Path:
    return write_recipe(root, out, student=STUDENT, loss=LOSS, train={**TRAIN, "micro_batch_size": micro})


def _same_run(a_dir: Path, b_dir: Path) -> None:
    assert_same_training(a_dir, b_dir, [1, 2, 3, 4, 5, 6])


def _resume_from(root: Path, src: Path, name: str) -> Path:
    """A copy of ``src`` cut back to its step-3 checkpoint."""
    part = root / name
    shutil.copytree(src, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "student")
    return part


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    two, one = root / "two", root / "one"
    proc = launch_two(FSDP, _recipe(root, two, 4))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"steps": 6') == 1  # only the main process prints the summary
    distill(load_config(_recipe(root, one, 8)))
    return root, two, one


def test_two_fsdp_processes_match_one_process_with_the_same_global_batch(runs):
    _, two, one = runs
    _same_run(two, one)
    val_a = [m for m in run_metrics(two) if m.get("split") == "val"]
    val_b = [m for m in run_metrics(one) if m.get("split") == "val"]
    assert [m["step"] for m in val_a] == [m["step"] for m in val_b] == [3, 6]
    for x, y in zip(val_a, val_b):
        assert x["tokens"] == y["tokens"]
        for key in ("kl_teacher_student", "student_perplexity", "teacher_perplexity"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), (key, x[key], y[key])
    state = json.loads((two / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (2, 8)
    # the saved student is a plain transformers folder with the tie intact
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(two / "student")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    opt = torch.load(two / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)
    assert all(isinstance(p, str) for g in opt["param_groups"] for p in g["params"])  # keyed by name


def test_fsdp_checkpoint_resumes_on_one_process(runs):
    root, two, one = runs
    part = _resume_from(root, two, "part-from-fsdp")
    distill(load_config(_recipe(root, part, 8)), resume=True)
    _same_run(part, one)


def test_one_process_checkpoint_resumes_under_fsdp(runs):
    root, two, one = runs
    part = _resume_from(root, one, "part-from-one")
    proc = launch_two(FSDP, _recipe(root, part, 4), "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stdout
    _same_run(part, one)


def test_fsdp_refuses_on_policy_and_qat(tmp_path):
    from distillery.fsdp import check_fsdp_recipe

    cfg = load_config(write_recipe(tmp_path, tmp_path / "o", generation={"on_policy_fraction": 0.5}))
    with pytest.raises(DistilleryError, match="on_policy_fraction > 0 is not supported with FSDP"):
        check_fsdp_recipe(cfg)
    cfg = load_config(write_recipe(tmp_path, tmp_path / "q", qat={"enabled": True}))
    with pytest.raises(DistilleryError, match="qat.enabled is not supported with FSDP"):
        check_fsdp_recipe(cfg)

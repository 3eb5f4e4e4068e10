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
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.config import load_config
from distillery.errors import DistilleryError
from distillery.train import distill
from helpers_run import write_recipe

REPO = Path(__file__).resolve().parents[1]
FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"
TRAIN = {"max_steps": 6, "save_every": 3, "eval_every": 3, "eval_batches": 1, "warmup_steps": 1}
STUDENT = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "tie_word_embeddings": True}}
LOSS = {"ce_weight": 0.5}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def _recipe(root: Path, out: Path, micro: int) -> Path:
    return write_recipe(root, out, student=STUDENT, loss=LOSS, train={**TRAIN, "micro_batch_size": micro})


def _launch_two(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([str(accelerate), "launch", "--config_file", str(FSDP), "--main_process_port", "0",
                           "-m", "distillery.cli", "distill", str(recipe), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _same_run(a_dir: Path, b_dir: Path, rel: float = 1e-5) -> None:
    a = [m for m in _metrics(a_dir) if "loss" in m]
    b = [m for m in _metrics(b_dir) if "loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in ("loss", "kd", "ce", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-6), (x["step"], key, x[key], y[key])
        assert x["tokens_seen"] == y["tokens_seen"] and x["lr"] == y["lr"]
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    worst = {key: max(abs(x[key] - y[key]) / abs(y[key]) for x, y in zip(a, b)) for key in ("loss", "kd", "ce", "grad_norm")}
    print(f"{a_dir.name} vs {b_dir.name}: max relative difference per step "
          f"{ {k: f'{v:.2g}' for k, v in worst.items()} }; max |weight difference| "
          f"{max(float((wa[k] - wb[k]).abs().max()) for k in wa):.2g}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    two, one = root / "two", root / "one"
    proc = _launch_two(_recipe(root, two, 4))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count('"steps": 6') == 1  # only the main process prints the summary
    distill(load_config(_recipe(root, one, 8)))
    return root, two, one


def test_two_fsdp_processes_match_one_process_with_the_same_global_batch(runs):
    _, two, one = runs
    _same_run(two, one)
    val_a = [m for m in _metrics(two) if m.get("split") == "val"]
    val_b = [m for m in _metrics(one) if m.get("split") == "val"]
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
    part = root / "part-from-fsdp"
    shutil.copytree(two, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "student")
    distill(load_config(_recipe(root, part, 8)), resume=True)
    _same_run(part, one)


def test_one_process_checkpoint_resumes_under_fsdp(runs):
    root, two, one = runs
    part = root / "part-from-one"
    shutil.copytree(one, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "student")
    proc = _launch_two(_recipe(root, part, 4), "--resume")
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

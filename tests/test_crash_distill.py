"""`distillery distill` under kill -9 at seeded random points, then `--resume`: the result is bitwise the
uninterrupted run's (student weights, last checkpoint, every metrics line but the timing), nothing
logged twice or lost, and at no kill does a partial checkpoint or student folder look finished.

A checkpoint every step makes a kill inside a checkpoint write likely. The default suite kills twice;
the slow tier six times with another seed (each restart pays ~5-10 s of imports on this machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from crash_harness import cli, draw_points, kill_and_resume, run_to_end
from helpers_run import write_recipe

STEPS = 16
TRAIN = {"max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2, "eval_every": 5, "eval_batches": 1,
         "micro_batch_size": 4, "warmup_steps": 2}


def _complete_checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file()) if root.is_dir() else []


def _progress(run: Path):
    def progress() -> int:
        done = _complete_checkpoints(run)
        return int(done[-1].name.split("-")[1]) if done else 0
    return progress


def _invariants(run: Path):
    """What must hold on disk after any kill: whatever looks finished is finished."""
    def check() -> None:
        for ck in _complete_checkpoints(run):
            state = json.loads((ck / "state.json").read_text())
            assert state["step"] == int(ck.name.split("-")[1])
            assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"} <= {p.name for p in ck.iterdir()}
            load_file(str(ck / "model.safetensors"))
        student = run / "student"
        if student.exists():  # renamed into place only once complete
            load_file(str(student / "model.safetensors"))
            assert (student / "config.json").is_file() and (student / "tokenizer.json").is_file()
        if (run / "metrics.jsonl").exists():
            lines = (run / "metrics.jsonl").read_text().splitlines()
            for line in lines[:-1]:
                json.loads(line)  # only the very last line may be cut short by a kill
    return check


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in ("tok_s", "step_s")} for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("crash-distill")
    ref = root / "ref"
    run_to_end(cli("distill", str(write_recipe(root, ref, train=TRAIN)), "--resume"))
    return root, ref


@pytest.mark.parametrize("seed, kills", [
    pytest.param(20240607, 2, id="2-kills"),
    pytest.param(913, 6, id="6-kills", marks=pytest.mark.slow),
])
def test_kill9_then_resume_equals_uninterrupted(reference, seed, kills):
    root, ref = reference
    run = root / f"run-{seed}"
    recipe = write_recipe(root, run, train=TRAIN)
    points = draw_points(seed, kills, first=1, last=STEPS - 3, max_delay=0.12)
    log = kill_and_resume(cli("distill", str(recipe), "--resume"), _progress(run), points, seed, check=_invariants(run))
    assert len(log.progress_at_kill) == kills, log

    assert (run / "student" / "model.safetensors").read_bytes() == (ref / "student" / "model.safetensors").read_bytes(), log
    assert [p.name for p in _complete_checkpoints(run)] == [p.name for p in _complete_checkpoints(ref)]
    last = _complete_checkpoints(run)[-1].name
    for name in ("model.safetensors", "state.json"):
        assert (run / "checkpoints" / last / name).read_bytes() == (ref / "checkpoints" / last / name).read_bytes()
    got, want = _metrics(run), _metrics(ref)
    assert got == want, f"metrics differ (lost or doubled lines?) {log}"
    assert [m["step"] for m in got if "loss" in m] == list(range(1, STEPS + 1))
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".step-") or ".tmp" in p.name]
    assert not leftovers, leftovers
    print(log)

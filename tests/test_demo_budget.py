"""The demo's time budget: steps that fit, measured on this machine, planned once."""

import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from distillery.config import load_config
from distillery.demo import demo_settings
from distillery.demo_budget import budget_plan, measure_step_seconds, plan_steps, scaled_step_seconds
from distillery.errors import DistilleryError
from helpers_run import write_recipe


def test_plan_steps_fills_the_budget_and_stays_in_bounds():
    # 900 s less 3 %, 250 s gone, 150 s of evaluation, 2 x 5 s overhead: 463 s for 2 runs of 1.4 s a step (x 1.2
    # slack) -> 137.8 -> 130
    assert plan_steps(900, 250, 1.4, max_steps=360, reserve_s=150) == 130
    assert plan_steps(900, 250, 1.4, max_steps=360, reserve_s=100) == 150  # 513 s -> 152.7 -> 150
    assert plan_steps(900, 250, 1.4, max_steps=360, reserve_s=100, slack=1.06) == 170  # 513 s -> 172.8 -> 170
    assert plan_steps(900, 250, 1.4, max_steps=360, reserve_s=100, slack=1.0) == 180  # 504 / 2.8 = 180
    assert plan_steps(900, 250, 0.4, max_steps=360) == 360  # a fast machine: never more than the recipe's
    assert plan_steps(900, 850, 1.4, max_steps=360) == 60  # nothing left: the fewest steps that still teach
    assert plan_steps(900, 850, 1.4, max_steps=40) == 40  # ... but never more than the recipe's
    assert plan_steps(600, 0, 1.0, max_steps=1000, reserve_s=0, overhead_s=0, margin=0, slack=1, runs=1, multiple=1) == 600


def test_measure_step_seconds_runs_the_recipe_and_leaves_nothing(tmp_path: Path):
    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"), [])
    folder = tmp_path / "probe"
    seen: list[float] = []
    step_s = measure_step_seconds(cfg, folder, steps=3, record=seen)
    assert 0 < step_s < 60 and not folder.exists()
    assert len(seen) == 3 and step_s == pytest.approx(sum(seen[1:]) / 2, abs=1e-3)  # the first (warm-up) left out
    assert not (tmp_path / "run").exists() and cfg.train.max_steps == 6  # the recipe itself is left as it was


def _records(steps):
    """metrics.jsonl records of (seconds, target positions) per step, tokens_seen cumulative as the loop writes it."""
    out, seen = [], 0
    for i, (sec, targets) in enumerate(steps, 1):
        seen += targets
        out.append({"step": i, "step_s": sec, "tokens_seen": seen})
    return out


def test_probe_seconds_are_scaled_to_the_pass_mix_of_target_positions():
    # warm-up step dropped; then t = 0.5 + 0.002 x targets exactly: 300 targets -> 1.1 s, 400 -> 1.3 s
    recs = _records([(5.0, 350), (1.1, 300), (1.3, 400), (1.1, 300), (1.3, 400)])
    assert scaled_step_seconds(recs, None) == pytest.approx(1.2)  # no pass mix known: the plain mean
    assert scaled_step_seconds(recs, 350) == pytest.approx(1.2)
    assert scaled_step_seconds(recs, 380) == pytest.approx(1.26)  # the pass holds more targets a step than the probe
    assert scaled_step_seconds(recs, 100_000) == pytest.approx(1.44)  # at most 20 % above the mean
    assert scaled_step_seconds(recs, 0) == pytest.approx(1.02)  # ... and at most 15 % below
    same = _records([(5.0, 300), (1.1, 300), (1.3, 300), (1.2, 300)])
    assert scaled_step_seconds(same, 500) == pytest.approx(1.2)  # no spread in the probe: nothing to fit
    falling = _records([(5.0, 300), (1.3, 300), (1.1, 400), (1.2, 350)])
    assert scaled_step_seconds(falling, 500) == pytest.approx(1.2)  # a line that does not rise is noise: the mean


def test_pass_targets_count_the_weighted_pass(tmp_path: Path):
    import torch

    from distillery.data import block_weights, build_datasets
    from distillery.demo_budget import pass_targets_per_step
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    (tmp_path / "cache" / "tokenizer").mkdir(parents=True)
    tok.save_pretrained(tmp_path / "cache" / "tokenizer")
    conv = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "A player."}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(30)))
    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"),
                      [f"data.train=[{tmp_path / 'corpus.txt'},{tmp_path / 'chat.jsonl'}]", "teacher.kind=cache",
                       f"teacher.cache_path={tmp_path / 'cache'}", "data.weights.chat=8", "train.micro_batch_size=2"])
    train = build_datasets(cfg.data, tok, progress=False).train
    t = train.batch(torch.arange(len(train)))["labels"].ne(-100).sum(1).double()
    chat = train.chat_blocks()
    assert 0 < int(chat.sum()) < len(train) and torch.equal(block_weights(train, cfg.data.weights) > 1, chat)
    want = 2 * float((8 * t[chat].sum() + t[~chat].sum()) / (8 * chat.sum() + (~chat).sum()))
    assert pass_targets_per_step(cfg) == pytest.approx(want)
    cfg.teacher.kind = "hf"  # a live teacher: its tokenizer is not at hand without loading it
    assert pass_targets_per_step(cfg) is None


def test_metrics_records_carry_step_seconds(tmp_path: Path):
    from distillery.train import distill

    out = tmp_path / "run"
    distill(load_config(write_recipe(tmp_path, out), ["train.max_steps=3", "train.log_every=2", "train.save_every=0"]))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step_s"' in x]
    assert [r["step"] for r in recs] == [2, 3] and all(r["step_s"] > 0 for r in recs)


def test_budget_plan_is_measured_once_and_reused(tmp_path: Path, monkeypatch):
    import distillery.demo_budget as budget

    calls = []
    monkeypatch.setattr(budget, "measure_step_seconds",
                        lambda cfg, folder, **kw: calls.append(folder) or kw["record"].extend([2.0, 1.5]) or 1.5)
    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"), ["train.max_steps=360"])
    console = Console(file=open(tmp_path / "log.txt", "w"))
    assert budget_plan(tmp_path, cfg, minutes=0, started=0.0, console=console) is None  # no budget: no plan
    plan = budget_plan(tmp_path, cfg, minutes=15, started=time.perf_counter(), console=console)
    assert plan["step_s"] == 1.5 and plan["recipe_steps"] == 360 and steps_ok(plan["steps"])
    assert plan["probe_step_s"] == [2.0, 1.5]  # each probe step's seconds, kept for reading a misled plan later
    assert plan["steps"] == plan_steps(900, plan["elapsed_s"], 1.5, max_steps=360)
    # a rerun (the demo cut short) reads the plan, whatever this machine measures now
    monkeypatch.setattr(budget, "measure_step_seconds", lambda cfg, folder, **kw: 0.01)
    assert budget_plan(tmp_path, cfg, minutes=15, started=0.0, console=console) == plan
    assert len(calls) == 1 and json.loads((tmp_path / "plan.json").read_text()) == plan


def steps_ok(steps: int) -> bool:
    return 60 <= steps <= 360 and steps % 10 == 0


def test_demo_minutes_setting():
    assert demo_settings(False)["minutes"] == 15 and demo_settings(True)["minutes"] == 0
    assert demo_settings(False, minutes=0)["minutes"] == 0 and demo_settings(True, minutes=30)["minutes"] == 0
    with pytest.raises(DistilleryError, match="--minutes must be >= 0"):
        demo_settings(False, minutes=-1)


def test_budget_plan_reserves_less_when_the_teachers_blimp_table_is_cached(tmp_path: Path, monkeypatch):
    import distillery.demo_budget as budget

    monkeypatch.setattr(budget, "measure_step_seconds", lambda cfg, folder, **kw: 1.5)
    cfg = load_config(write_recipe(tmp_path, tmp_path / "run"), ["train.max_steps=360"])
    console = Console(file=open(tmp_path / "log.txt", "w"))
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    cold.mkdir(), warm.mkdir()
    p_cold = budget_plan(cold, cfg, minutes=15, started=time.perf_counter(), console=console)
    p_warm = budget_plan(warm, cfg, minutes=15, started=time.perf_counter(), console=console, blimp_cached=True)
    assert p_cold["eval_reserve_s"] == budget.EVAL_RESERVE_S and not p_cold["teacher_blimp_cached"]
    assert p_warm["eval_reserve_s"] == budget.EVAL_RESERVE_S - budget.TEACHER_BLIMP_S and p_warm["teacher_blimp_cached"]
    # 40 s more for 2 runs of 1.5 s a step: 13 more steps, 10 after rounding to tens (or the same, at a boundary)
    assert p_warm["steps"] - p_cold["steps"] in (10, 20)
    assert p_warm["steps"] == plan_steps(900, p_warm["elapsed_s"], 1.5, max_steps=360,
                                         reserve_s=budget.EVAL_RESERVE_S - budget.TEACHER_BLIMP_S)


def test_teacher_blimp_cached_reads_the_table_the_evaluation_writes(tmp_path: Path):
    from distillery.demo_eval import blimp_sample, teacher_blimp, teacher_blimp_cached

    assert not teacher_blimp_cached(tmp_path, 1)
    pairs, key, name = blimp_sample(1)
    (tmp_path / name).write_text(json.dumps({"key": dict(key, seed=1), "table": {}}))
    assert not teacher_blimp_cached(tmp_path, 1)  # another sample's table under that name: not this one
    (tmp_path / name).write_text("{half a fi")
    assert not teacher_blimp_cached(tmp_path, 1)  # a torn file: not cached (the evaluation scores it again)
    (tmp_path / name).write_text("[]")
    assert not teacher_blimp_cached(tmp_path, 1)
    (tmp_path / name).write_text(json.dumps({"key": key, "table": {"overall": 0.7}}))
    assert teacher_blimp_cached(tmp_path, 1) and not teacher_blimp_cached(tmp_path, 2)
    assert teacher_blimp(None, None, pairs, tmp_path / name, key) == {"overall": 0.7}  # what the evaluation reads

"""The demo's time budget: how many training steps fit ``--minutes`` on this machine.

The demo's recipe trains each student 360 steps. That fits 15 minutes where the CPU trains in bf16 (a Zen 4 EPYC:
13.4 min for the whole demo) but not on an AVX2-only EPYC (fp32, ~1.4 s a step: 24 min). So before the first run
the demo measures this machine: the KD recipe itself runs ``PROBE_STEPS`` steps in a scratch folder (the same code,
data, cached targets and precision as the real run; ``step_s`` of its ``metrics.jsonl``), and

    steps = (budget * (1 - MARGIN) - elapsed - EVAL_RESERVE_S - 2 * RUN_OVERHEAD_S) / (2 * step_s)

(``EVAL_RESERVE_S`` less ``TEACHER_BLIMP_S`` when the teacher's BLiMP table is already cached)

rounded down to a multiple of ``MULTIPLE``, at most the recipe's steps and at least ``MIN_STEPS`` (then the demo
says it will overrun). Both runs train that many steps (same data order, same schedule shape). The plan is written
to ``plan.json`` in the demo folder, so a demo that is cut short and rerun trains the steps it planned the first
time. ``--minutes 0`` keeps the recipe's steps whatever the time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

PROBE_STEPS = 8  # a step's time varies with its blocks' lengths (1.1-1.8 s on the AVX2 EPYC): average several
# The evaluation after training (BLiMP of teacher and students, answers, perplexities): 124 s on the Zen 4 EPYC and
# 137-143 s on the AVX2 EPYC with the teacher's BLiMP table not yet cached (benchmarks/results/demo.json,
# demo_zen3_*.json, timings.eval_s); 85 s and 102 s with it cached (demo_seed1.json, demo_zen3_budget_warm_seed1.json):
# scoring the teacher's table is ~40 s of it, which a demo whose table is cached does not reserve.
EVAL_RESERVE_S = 150.0
TEACHER_BLIMP_S = 40.0
RUN_OVERHEAD_S = 5.0  # per run: loading its data and cached targets, the final save and validation (~3 s measured)
MIN_STEPS = 60
# Steps vary around the probe's mean and the process starts before the demo's clock: a plan for exactly 15 min ended
# 11 s over (benchmarks/results/demo_zen3_budget150.json: 150 steps, the CE run 1.49 s a step against 1.36 probed).
MARGIN = 0.03
MULTIPLE = 10


def plan_steps(budget_s: float, elapsed_s: float, step_s: float, *, max_steps: int, runs: int = 2,
               reserve_s: float = EVAL_RESERVE_S, overhead_s: float = RUN_OVERHEAD_S, margin: float = MARGIN,
               min_steps: int = MIN_STEPS, multiple: int = MULTIPLE) -> int:
    """Steps per run so that ``runs`` runs of ``step_s`` seconds a step and the evaluation end within ``budget_s``
    less a ``margin`` share of it."""
    left = budget_s * (1 - margin) - elapsed_s - reserve_s - runs * overhead_s
    fit = int(left / (runs * step_s)) // multiple * multiple if step_s > 0 else max_steps
    return max(min(fit, max_steps), min(min_steps, max_steps))


def measure_step_seconds(cfg, folder: Path, steps: int = PROBE_STEPS) -> float:
    """Seconds per training step of ``cfg`` on this machine: ``steps`` steps in ``folder`` (removed after), the
    mean ``step_s`` of all but the first (which pays for warm-up: allocations, kernel choice)."""
    from .train import distill

    probe = cfg.model_copy(deep=True)
    probe.train.max_steps, probe.train.output_dir = steps, str(folder)
    probe.train.save_every, probe.train.eval_every, probe.train.log_every = 0, 0, 1
    probe.train.progress = False  # validation stays: the run's data split must be the one the targets hold
    shutil.rmtree(folder, ignore_errors=True)  # a probe cut short earlier: start it again
    try:
        distill(probe)
        records = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    timed = [r["step_s"] for r in records if "step_s" in r]
    return statistics.fmean(timed[1:] or timed)


def budget_plan(out: Path, cfg, *, minutes: float, started: float, console, blimp_cached: bool = False) -> dict | None:
    """The steps both runs train (``plan.json`` in ``out``, measured once); None when there is no budget.
    ``blimp_cached``: the teacher's BLiMP table is cached, so the evaluation needs ``TEACHER_BLIMP_S`` less."""
    if minutes <= 0:
        return None
    path = out / "plan.json"
    if path.is_file():
        return json.loads(path.read_text())
    recipe_steps = cfg.train.max_steps
    console.print(f"timing {PROBE_STEPS} training steps to fit the {minutes:g}-minute budget ...", highlight=False)
    step_s = measure_step_seconds(cfg, out / "speed_probe")
    elapsed = time.perf_counter() - started
    reserve = EVAL_RESERVE_S - (TEACHER_BLIMP_S if blimp_cached else 0.0)
    steps = plan_steps(minutes * 60, elapsed, step_s, max_steps=recipe_steps, reserve_s=reserve)
    plan = {"minutes": minutes, "step_s": step_s, "elapsed_s": elapsed, "eval_reserve_s": reserve,
            "teacher_blimp_cached": blimp_cached, "recipe_steps": recipe_steps, "steps": steps,
            "expected_s": elapsed + 2 * (steps * step_s + RUN_OVERHEAD_S) + reserve}
    path.write_text(json.dumps(plan, indent=1) + "\n")
    why = (f"the recipe's {recipe_steps}" if steps == recipe_steps else
           f"{steps} of the recipe's {recipe_steps} (--minutes 0 for all)")
    console.print(f"{step_s:.2f} s a step here: each run trains {why} steps; the demo should end after about "
                  f"{plan['expected_s'] / 60:.1f} min" + (" (over the budget: the fewest steps that still teach)"
                                                           if plan["expected_s"] > minutes * 60 else ""),
                  highlight=False)
    return plan

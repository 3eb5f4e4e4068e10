"""The demo's time budget: how many training steps fit ``--minutes`` on this machine.

The demo's recipe trains each student up to 720 steps of 2 blocks (360 of 4 before). 360 of 4 fit 15 minutes where the
CPU trains in bf16 (a Zen 4 EPYC: 13.4 min for the whole demo) but not on an AVX2-only EPYC (fp32, ~1.4 s a step: 24 min). So before the first run
the demo measures this machine: the KD recipe itself runs ``PROBE_STEPS`` steps in a scratch folder (the same code,
data, cached targets and precision as the real run; ``step_s`` of its ``metrics.jsonl``, scaled from the probe's
blocks to the whole pass's mix of target positions: :func:`scaled_step_seconds`), and

    steps = (budget * (1 - MARGIN) - elapsed - EVAL_RESERVE_S - 2 * RUN_OVERHEAD_S) / (2 * step_s * STEP_SLACK)

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

PROBE_STEPS = 12  # a step's time varies with its blocks (1.0-1.8 s on the AVX2 EPYC): average several, and scale
# the mean to the whole pass's target positions (:func:`scaled_step_seconds`): a cold demo's 7 timed probe steps held
# 298 target positions a step against the pass's 366, measured 0.98 s against the run's 1.13, and the demo planned
# for 0.98 ended 12 s over its 15 minutes (benchmarks/results/demo_zen3_budget_chat8_cold.json)
# The evaluation after training (BLiMP of teacher and students, answers, perplexities): 124 s on the Zen 4 EPYC and
# 137-143 s on the AVX2 EPYC with the teacher's BLiMP table not yet cached (benchmarks/results/demo.json,
# demo_zen3_*.json, timings.eval_s); 85 s and 102 s with it cached (demo_seed1.json, demo_zen3_budget_warm_seed1.json):
# scoring the teacher's table is ~40 s of it, which a demo whose table is cached does not reserve. The teacher's
# work on the held-out blocks is now done once for both students (demo_eval.RememberedTeacher): 116 s cold on the
# AVX2 EPYC (demo_zen3_bfd_cold.json), 128 s with the 2-block batches of the recipe (demo_zen3_mb2_cold.json; the
# evaluation's batches are 4 blocks again since). With the greedy answers to 96 more held-out prompts: 147 s cold
# (demo_zen3_more_cold.json, on an hour whose teacher steps ran 6 % slower than the run before).
EVAL_RESERVE_S = 160.0
TEACHER_BLIMP_S = 40.0
RUN_OVERHEAD_S = 5.0  # per run: loading its data and cached targets, the final save and validation (~3 s measured)
MIN_STEPS = 60
# Steps vary around the probe's mean and the process starts before the demo's clock: a plan for exactly 15 min ended
# 11 s over (benchmarks/results/demo_zen3_budget150.json: 150 steps, the CE run 1.49 s a step against 1.36 probed).
# With 2 blocks a step the runs' steps took 4-9 % longer than the probe's (0.650 s probed, 0.683 / 0.660 run;
# 0.610 probed, 0.659 / 0.665 run: demo_zen3_more_cold*.json), and a 3 % margin ended at 884 s and 899 s; a warm
# demo at a 5 % margin ran them 6 % (KD) and 14 % (CE) over the probe's 0.780 s and ended at 917 s
# (demo_zen3_more_warm.json), while a cold one read 6 % slow and ended at 831 s (demo_zen3_more_cold_seed2.json).
# The error is the steps', so it is planned on the steps: each counts STEP_SLACK times the probe's time, and the
# budget keeps MARGIN of itself for the rest. All four would have ended by 883 s. At 1.06 a warm demo then ran its
# steps 17 % (KD) and 18 % (CE) over its probe's 0.715 s and ended at 928 s (demo_zen3_slack_warm.json), while a cold
# one on the same hour read 7 % slow (0.803 s probed, 0.750 / 0.786 run; 811 s, demo_zen3_slack_cold.json). The
# machine is shared, and its speed moves by 10-20 % within minutes: the same 120 steps rerun in a fresh process took
# 0.90, 0.95, 0.84, 0.71, 0.79, 0.81 s a step by sixths against 0.66 ... 0.79 in the demo (no trend in the process's
# age), so no probe predicts it and the slack covers it. At 1.12 a second warm demo ran its steps 29 % (KD) and 24 %
# (CE) over the probe's 0.758 s and ended at 915 s (demo_zen3_slack112_warm.json). Over the seven demos measured, the
# runs' steps took 0.94-1.09x the probe's time in the four cold ones and 1.10-1.27x in the three warm ones (a warm
# probe runs first thing in a fresh process; why it reads fast is not known). At 1.20 and a 3 % margin all seven
# would have ended at 775-877 s (benchmarks/results/demo_zen3_{more,slack}*.json), 10-30 fewer steps a run than 1.12.
# The error runs the other way too: a warm demo at 1.20 whose probe ran beside another process read 1.18 s a step
# against 0.94 / 0.85 run, planned 250 steps and ended at 606 s (demo_zen3_slack120_warm.json); plan.json keeps each
# probe step's seconds since, so such a reading can be told apart.
MARGIN = 0.03
STEP_SLACK = 1.20
MULTIPLE = 10


def plan_steps(budget_s: float, elapsed_s: float, step_s: float, *, max_steps: int, runs: int = 2,
               reserve_s: float = EVAL_RESERVE_S, overhead_s: float = RUN_OVERHEAD_S, margin: float = MARGIN,
               slack: float = STEP_SLACK, min_steps: int = MIN_STEPS, multiple: int = MULTIPLE) -> int:
    """Steps per run so that ``runs`` runs of ``step_s * slack`` seconds a step and the evaluation end within
    ``budget_s`` less a ``margin`` share of it."""
    left = budget_s * (1 - margin) - elapsed_s - reserve_s - runs * overhead_s
    fit = int(left / (runs * step_s * slack)) // multiple * multiple if step_s > 0 else max_steps
    return max(min(fit, max_steps), min(min_steps, max_steps))


def scaled_step_seconds(records: list[dict], pass_targets: float | None) -> float:
    """A step's seconds from the probe's ``metrics.jsonl`` records (``step_s``, cumulative ``tokens_seen``), all but
    the first (warm-up: allocations, kernel choice). The mean, moved along the least-squares line of step time on
    the step's target positions to ``pass_targets``, the mean target positions a step of the whole (weighted) pass
    holds: the LM head's cost grows with the target positions, and a few steps hold a few blocks, not the pass's mix.
    The move is dropped where the line does not rise (too little spread to fit) and kept within -15 % / +20 % of the
    mean: the mix alone moved it +15 % on the AVX2 EPYC, and a probe slowed by another process fits a steep line (a
    probe at 1.40 s a step, whose run took 1.25, was moved to 1.87 by a bound of a third)."""
    steps = [r for r in records if "step_s" in r]
    per_step = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip([{"tokens_seen": 0}] + steps, steps)]
    x, y = per_step[1:] or per_step, [r["step_s"] for r in steps[1:] or steps]
    mean_y = statistics.fmean(y)
    if pass_targets is None or len(x) < 3 or len(set(x)) < 2:
        return mean_y
    slope = statistics.linear_regression(x, y).slope  # ordinary least squares
    if not slope > 0:
        return mean_y
    return min(max(mean_y + slope * (pass_targets - statistics.fmean(x)), 0.85 * mean_y), 1.2 * mean_y)


def pass_targets_per_step(cfg) -> float | None:
    """The mean target positions of a step of ``cfg``'s run over a whole pass, ``data.weights`` counted; None when the
    run's tokenizer is not at hand without loading its teacher (only a cached teacher keeps it beside its targets)."""
    tok_dir = Path(cfg.teacher.cache_path or "") / "tokenizer"
    if cfg.teacher.kind != "cache" or not tok_dir.is_dir():
        return None
    import torch
    from transformers import AutoTokenizer

    from .data import block_weights, build_datasets

    train = build_datasets(cfg.data, AutoTokenizer.from_pretrained(tok_dir), progress=False).train
    targets = train.batch(torch.arange(len(train)))["labels"].ne(-100).sum(1).double()
    w = block_weights(train, cfg.data.weights)
    w = torch.ones_like(targets) if w is None else w
    return float((w * targets).sum() / w.sum()) * cfg.train.micro_batch_size * cfg.train.grad_accum


def measure_step_seconds(cfg, folder: Path, steps: int = PROBE_STEPS, pass_targets: float | None = None,
                         record: list | None = None) -> float:
    """Seconds per training step of ``cfg`` on this machine: ``steps`` steps in ``folder`` (removed after), their
    :func:`scaled_step_seconds` (the plain mean of all but the first when ``pass_targets`` is None). ``record``, a
    list, receives each step's seconds (``plan.json`` keeps them: a probe's misreadings can be told apart later)."""
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
    if record is not None:
        record.extend(round(r["step_s"], 4) for r in records if "step_s" in r)
    return scaled_step_seconds(records, pass_targets)


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
    pass_targets = pass_targets_per_step(cfg)
    probe_steps: list[float] = []
    step_s = measure_step_seconds(cfg, out / "speed_probe", pass_targets=pass_targets, record=probe_steps)
    elapsed = time.perf_counter() - started
    reserve = EVAL_RESERVE_S - (TEACHER_BLIMP_S if blimp_cached else 0.0)
    steps = plan_steps(minutes * 60, elapsed, step_s, max_steps=recipe_steps, reserve_s=reserve)
    plan = {"minutes": minutes, "step_s": step_s, "elapsed_s": elapsed, "eval_reserve_s": reserve,
            "teacher_blimp_cached": blimp_cached, "recipe_steps": recipe_steps, "steps": steps,
            "probe_steps": PROBE_STEPS, "probe_step_s": probe_steps, "pass_targets_per_step": pass_targets,
            "step_slack": STEP_SLACK, "expected_s": elapsed + 2 * (steps * step_s * STEP_SLACK + RUN_OVERHEAD_S) + reserve}
    path.write_text(json.dumps(plan, indent=1) + "\n")
    why = (f"the recipe's {recipe_steps}" if steps == recipe_steps else
           f"{steps} of the recipe's {recipe_steps} (--minutes 0 for all)")
    console.print(f"{step_s:.2f} s a step here: each run trains {why} steps; the demo should end after about "
                  f"{plan['expected_s'] / 60:.1f} min" + (" (over the budget: the fewest steps that still teach)"
                                                           if plan["expected_s"] > minutes * 60 else ""),
                  highlight=False)
    return plan

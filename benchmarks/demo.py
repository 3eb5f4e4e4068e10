"""Time ``distillery demo`` (what ``make demo`` runs) and record its numbers with the machine it ran on.

    .venv/bin/python benchmarks/demo.py [--quick] [--threads 2] [--work-dir runs/bench/demo] [--keep] [--trend]

Runs the demo as a child process in a fresh work folder; ``<work>_home/`` beside it is the child's
``DISTILLERY_HOME`` (the converted teacher linked in, the demo's teacher cache empty: a first demo; ``--keep``
reuses both, e.g. to time a second demo whose teacher answers and BLiMP table are cached), measures its wall
time, and writes ``benchmarks/results/demo.json`` (``demo_quick.json`` with ``--quick``): the demo's
``results.json`` (teacher and students: held-out and Milton perplexity/KL, BLiMP, answer fidelity, the goals,
answers side by side), the machine (``common.machine_info``) and the load average before and after: the
machine is shared, so a run on a loaded machine says so.

``--trend`` (after the timed demo, not counted in its time): BLiMP of every checkpoint the two runs kept
(``train.save_every``), on the demo's own pairs and prefix, so the record shows how the students' BLiMP moves
with training tokens, a measured trend rather than a guess at what more training would reach.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from distillery.teachers.hf import distillery_home  # noqa: E402


def blimp_trend(work: Path, results: dict, threads: int) -> dict:
    """``{run: [{"step", "tokens", "blimp"}]}`` over the checkpoints each run kept, the final student last."""
    import torch
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.tasks.blimp import load_pairs, score_blimp

    torch.set_num_threads(threads)
    b = results["blimp"]
    pairs = load_pairs(per_paradigm=b["per_paradigm"], seed=0)
    trend = {}
    for name, run in results["runs"].items():
        student_dir = Path(run["student_dir"])
        tok = AutoTokenizer.from_pretrained(student_dir)
        model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        steps = {json.loads(ln)["step"]: json.loads(ln).get("tokens_seen")
                 for ln in (work / name / "metrics.jsonl").read_text().splitlines() if '"tokens_seen"' in ln}
        rows = []
        for ckpt in sorted((work / name / "checkpoints").glob("step-*")):
            step = int(ckpt.name.split("-")[1])
            if step == run["steps"]:
                continue  # the final student below
            load_model(model, str(ckpt / "model.safetensors"))  # tied head: stored once, load_model knows
            acc = score_blimp(model, tok, pairs, prefix=b["prefix"])["overall"]
            rows.append({"step": step, "tokens": steps.get(step), "blimp": acc})
        rows.append({"step": run["steps"], "tokens": run["tokens"], "blimp": run["blimp"]["overall"]})
        trend[name] = rows
    return trend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "demo"))
    ap.add_argument("--keep", action="store_true", help="reuse the work folder (cached teacher answers, finished runs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trend", action="store_true", help="BLiMP of every kept checkpoint (after the timed run)")
    ap.add_argument("--demo-arg", action="append", default=[], metavar="ARG",
                    help="passed on to the demo (repeatable), e.g. --demo-arg=--answer-temperature=0.7")
    args = ap.parse_args()
    work = Path(args.work_dir)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work.with_name(work.name + "_home"), ignore_errors=True)
    cmd = [sys.executable, "-m", "distillery.cli", "demo", "--output-dir", str(work)] + (["--quick"] if args.quick else []) + args.demo_arg
    if args.trend:  # keep about five checkpoints per run to score afterwards
        from distillery.demo import SETTINGS

        steps = SETTINGS["quick" if args.quick else "full"]["steps"]
        cmd += [f"train.save_every={max(steps // 5, 1)}", "train.keep_checkpoints=6"]
    # The child's DISTILLERY_HOME: the converted teacher linked in (a one-time ~40 s conversion, not the demo's), the
    # demo's teacher cache (answers, BLiMP table) empty: a first demo. With --keep it stays: a second demo.
    home, real_home = work.with_name(work.name + "_home"), distillery_home()  # beside it: the demo wants its folder empty
    (home / "teachers").parent.mkdir(parents=True, exist_ok=True)
    if not (home / "teachers").exists():
        (real_home / "teachers").mkdir(parents=True, exist_ok=True)  # a fresh machine has none yet: link a real folder
        (home / "teachers").symlink_to(real_home / "teachers", target_is_directory=True)
    teacher_cache = "warm" if (home / "demo").is_dir() else "cold"
    machine = common.machine_info(command=cmd, threads=args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=common.child_env(args.threads, {"DISTILLERY_HOME": str(home)}), cwd=common.ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    machine["load_average_end"] = common.loadavg()
    (work / "demo.log").parent.mkdir(parents=True, exist_ok=True)
    (work / "demo.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    results = json.loads((work / "results.json").read_text())
    record = {"benchmark": "demo", "quick": args.quick, "wall_seconds": wall, "machine": machine,
              "reused_work_dir": args.keep, "teacher_cache": teacher_cache, **results}
    if args.trend:
        record["blimp_trend"] = blimp_trend(work, results, args.threads)
    out = Path(args.out or common.RESULTS / ("demo_quick.json" if args.quick else "demo.json"))
    common.write_json(record, out)
    print(json.dumps({"wall_seconds": round(wall), "goals": results.get("goals"), "out": str(out)}, indent=2))


if __name__ == "__main__":
    main()

"""`distillery plan` against measured peak RSS and step time, on CPU, for three recipe sizes.

    .venv/bin/python benchmarks/plan_vs_rss.py [--work-dir runs/plan_vs_rss] [--only tiny,mid,smollm2,smollm2_cache]

Recipes: ``tiny`` (the tests' 2-layer d=64 teacher, 1-layer d=32 student, V=512), ``mid`` (a random
6-layer d=384 Llama teacher, 4-layer d=192 student, V=4,096, seq 256), ``smollm2`` (the demo recipe:
SmolLM2-135M-Instruct -> 4-layer d=256 student, V=49,152, seq 128) for a few steps, and
``smollm2_cache`` (the same from a teacher cache written first with `distillery cache`).
Each run is a fresh child process (``distillery.cli distill``), so its ``VmHWM`` is the run's own
peak RSS; the plan is the `distillery plan` JSON for the same recipe and overrides, with the
throughput probe run in the same conditions (OMP_NUM_THREADS=1). Results:
``benchmarks/results/plan_vs_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CHILD = """
import resource, sys, json
from distillery.cli import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print('PEAK_RSS', hwm, file=sys.stderr)
sys.exit(rc)
"""


def _tiny(work: Path) -> tuple[Path, list[str]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_run import write_recipe

    return write_recipe(work, work / "tiny-run", train={"eval_every": 0, "save_every": 0}), ["train.max_steps=6"]


def _mid(work: Path) -> tuple[Path, list[str]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_run import make_corpus
    from tiny import tiny_llama, tiny_tokenizer

    teacher = work / "mid-teacher"
    if not (teacher / "config.json").exists():
        tiny_llama(vocab_size=4096, hidden=384, layers=6, heads=6, kv_heads=2, ffn=1024, max_pos=1024,
                   seed=3).save_pretrained(teacher)
        tiny_tokenizer(4096, seed_text_chars=400_000).save_pretrained(teacher)
    recipe = {"teacher": {"source": str(teacher)},
              "student": {"model": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
                                    "num_attention_heads": 4, "num_key_value_heads": 2}},
              "data": {"train": [str(make_corpus(work, 400_000))], "seq_len": 256, "val_fraction": 0.05},
              "loss": {"chunk_size": 512},
              "train": {"output_dir": str(work / "mid-run"), "micro_batch_size": 8, "eval_every": 0,
                        "save_every": 0, "eval_batches": 2, "progress": False}}
    path = work / "recipe-mid.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, ["train.max_steps=5"]


SMOL = ["train.max_steps=4", "data.max_train_blocks=64", "data.max_val_blocks=16", "train.eval_batches=2",
        "train.save_every=0", "train.progress=false"]


def _smollm2(work: Path) -> tuple[Path, list[str]]:
    return ROOT / "configs" / "smollm2_student.yaml", SMOL + [f"train.output_dir={work / 'smollm2-run'}"]


def _smollm2_cache(work: Path) -> tuple[Path, list[str]]:
    recipe = ROOT / "configs" / "smollm2_student.yaml"
    cache = work / "smollm2-cache"
    if not (cache / "manifest.json").exists():
        subprocess.run([PY, "-m", "distillery.cli", "cache", str(recipe), *SMOL, "--out", str(cache), "--k", "32",
                        "--no-progress"], check=True, env=_env())
    return recipe, SMOL + ["teacher.kind=cache", f"teacher.cache_path={cache}",
                           f"train.output_dir={work / 'smollm2-cache-run'}"]


RECIPES = {"tiny": _tiny, "mid": _mid, "smollm2": _smollm2, "smollm2_cache": _smollm2_cache}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _measure(recipe: Path, overrides: list[str], out: Path) -> dict:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", CHILD, "distill", str(recipe), *overrides], capture_output=True, text=True,
                          env=_env())
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(next(ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS")))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "tok_s" in x]
    tokens = (steps[1]["tokens_seen"] - steps[0]["tokens_seen"]) if len(steps) > 1 else steps[0]["tokens_seen"]
    secs = [tokens / x["tok_s"] for x in steps[1:]]  # the first step includes warm-up
    return {"peak_rss_bytes": peak, "seconds_per_step_median": statistics.median(secs) if secs else None,
            "wall_s": time.perf_counter() - t0}


def _plan(recipe: Path, overrides: list[str], work: Path, name: str) -> dict:
    js = work / f"plan-{name}.json"
    subprocess.run([PY, "-m", "distillery.cli", "plan", str(recipe), *overrides, "--json", str(js)],
                   check=False, env=_env(), capture_output=True)
    return json.loads(js.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "plan_vs_rss"))
    ap.add_argument("--only", default=",".join(RECIPES))
    ap.add_argument("--plan-only", action="store_true", help="recompute the plans, keep the measurements on file")
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = ROOT / "benchmarks" / "results" / "plan_vs_rss.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.only.split(","):
        recipe, overrides = RECIPES[name](work)
        plan = _plan(recipe, overrides, work, name)
        out = Path(yaml.safe_load(recipe.read_text())["train"]["output_dir"])
        for o in overrides:
            if o.startswith("train.output_dir="):
                out = Path(o.split("=", 1)[1])
        measured = results[name]["measured"] if args.plan_only else _measure(recipe, overrides, out)
        results[name] = {"recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else recipe.name,
                         "overrides": overrides, "plan": plan, "measured": measured,
                         "peak_ratio_plan_over_measured": plan["peak_bytes_per_process"] / measured["peak_rss_bytes"],
                         "threads": 1, "plan_date": time.strftime("%Y-%m-%d %H:%M"),
                         "date": results.get(name, {}).get("date") if args.plan_only else time.strftime("%Y-%m-%d %H:%M"),
                         "load_average": results.get(name, {}).get("load_average") if args.plan_only else os.getloadavg()}
        print(f"{name}: plan {plan['peak_bytes_per_process'] / 2**30:.3f} GB, measured "
              f"{measured['peak_rss_bytes'] / 2**30:.3f} GB; step plan {plan['seconds_per_step']:.3g} s, "
              f"measured {measured['seconds_per_step_median']}", flush=True)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Learning-rate sweep for the quality benchmark's CE and KD baselines (random init), each method at its best.

    .venv/bin/python benchmarks/quality_lr.py [--size medium] [--lrs 1e-3,2e-3,4e-3] [--runs ce_random,kd_random]

The quality goal "(2) KD beats (1) CE on held-out KL by >= 30%" compares two methods at one shared
learning rate (quality.py's 2e-3). A fair comparison gives each method its own best rate, so this runs
``benchmarks/quality.py --runs ce_random,kd_random --lr X`` for every X (one process per run, same data,
steps, seed), reads each result file, and reports per method the rate with the lowest *validation* KL at
the end of training (the metric logged during the run), then the held-out and Milton (never trained on,
not used to choose) KL of that choice. A sweep point whose result file already exists is reused
(``--fresh`` reruns it). Writes ``benchmarks/results/quality_lr_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def point_path(size: str, lr: str) -> Path:
    return common.RESULTS / "quality_lr" / f"{size}_lr{lr}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("medium", "full"), default="medium")
    ap.add_argument("--lrs", default="1e-3,2e-3,4e-3")
    ap.add_argument("--runs", default="ce_random,kd_random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="rerun sweep points whose result file exists")
    ap.add_argument("--reuse", action="append", default=[], metavar="LR=PATH",
                    help="take this rate's point from an earlier quality.py result with the same size and seed "
                         "(e.g. 2e-3=benchmarks/results/quality_medium.json)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/quality_lr_<size>.json")
    args = ap.parse_args()
    lrs, runs = args.lrs.split(","), args.runs.split(",")
    reused = dict(r.split("=", 1) for r in args.reuse)
    points = {}
    for lr in lrs:
        path = Path(reused[lr]) if lr in reused else point_path(args.size, lr)
        if lr not in reused and (args.fresh or not path.is_file()):
            cmd = [sys.executable, str(Path(__file__).with_name("quality.py")), "--size", args.size, "--runs",
                   args.runs, "--lr", lr, "--threads", str(args.threads), "--out", str(path),
                   "--work-dir", str(common.ROOT / "runs" / "bench" / f"quality_lr{lr}")]
            print("[quality_lr]", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, cwd=common.ROOT)
        points[lr] = json.loads(path.read_text())
    table, best = {}, {}
    for name in runs:
        table[name] = {}
        for lr, res in points.items():
            r = res["runs"].get(name)
            if not r:
                continue
            table[name][lr] = {"final_val_kl": r["curves"]["val"][-1]["kl_teacher_student"],
                               "heldout_kl": r["heldout"]["kl_teacher_student"],
                               "heldout_top1": r["heldout"]["top1_agreement"],
                               "heldout_ppl": r["heldout"]["student_perplexity"],
                               "milton_kl": r["milton"]["kl_teacher_student"],
                               "tokens_seen": r["curves"]["tokens_seen"]}
        if table[name]:
            lr = min(table[name], key=lambda x: table[name][x]["final_val_kl"])
            best[name] = {"lr": lr, **table[name][lr]}
    verdict = {}
    if {"ce_random", "kd_random"} <= best.keys():
        for metric in ("heldout_kl", "milton_kl"):
            verdict[f"kd_vs_ce_{metric}_reduction (each at its best lr)"] = 1 - best["kd_random"][metric] / best["ce_random"][metric]
        verdict["goal: KD beats CE on held-out KL by >= 30%"] = verdict["kd_vs_ce_heldout_kl_reduction (each at its best lr)"] >= 0.30
    first = next(iter(points.values()))
    report = {"benchmark": "quality_lr", "size": args.size, "machine": common.machine_info(threads=args.threads),
              "settings": {"lrs": lrs, "runs": runs, "chosen_by": "final validation KL (logged during training)",
                           "per_point_results": {lr: reused.get(lr) or str(point_path(args.size, lr).relative_to(common.ROOT))
                                                 for lr in lrs},
                           "student_shape": first.get("student_shape")},
              "table": table, "best": best, "verdict": verdict,
              "limits": "one seed per point; validation and held-out come from the same split (Milton is the "
                        "unbiased check); CPU only"}
    out = Path(args.out or common.RESULTS / f"quality_lr_{args.size}.json")
    common.write_json(report, out)
    for name, rows in table.items():
        for lr, row in rows.items():
            print(f"{name:<10} lr {lr:>6}: val KL {row['final_val_kl']:.3f}  held-out KL {row['heldout_kl']:.3f}  "
                  f"Milton KL {row['milton_kl']:.3f}  ppl {row['heldout_ppl']:.0f}")
    for k, v in verdict.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

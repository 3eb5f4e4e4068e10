"""LoRA vs full distillation of the same pretrained student, same teacher, same data, same steps.

1. ``pretrain``: the demo's student shape pruned from SmolLM2-135M-Instruct (8 layers, d=384, FFN 1,024,
   6/3 heads: 31.9M, ``distillery.demo.PRUNE``) and distilled for ``--pretrain-steps`` steps (full KD).
2. ``full`` and ``lora``: that student continued for ``--steps`` steps on the same blocks (same seed, so the
   same order), every weight training vs a LoRA adapter (``student.lora``: rank ``--rank``, alpha 2·rank,
   all linear layers but the head); the LoRA student is saved merged.

Each phase runs in its own process (peak RSS is that process's VmHWM). Reported per run: held-out KL(teacher ‖
student) on the validation split at the end, trainable parameters, steady tok/s (median of the logged
windows after the first), peak RSS, wall time. Writes ``benchmarks/results/lora.json``.

    .venv/bin/python benchmarks/lora.py [--steps 30] [--pretrain-steps 30] [--rank 16] [--threads 2] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine_info, peak_rss_bytes, run_child, write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "lora.json"


def recipe(spec: dict) -> dict:
    from distillery.demo import PRUNE

    student = ({"init": "pruned", "prune": dict(PRUNE)} if spec["phase"] == "pretrain"
               else {"init": "pretrained", "pretrained": spec["pretrained"], "model": {}})
    if spec["phase"] == "lora":
        student["lora"] = {"rank": spec["rank"], "alpha": 2.0 * spec["rank"], "target_modules": "all-linear"}
    return {
        "teacher": {"source": "smollm2", "dtype": "float32"},
        "student": student,
        "data": {"train": ["demo:shakespeare"], "seq_len": spec["seq_len"], "val_fraction": 0.02, "max_train_blocks": 2000},
        "loss": {"kd": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "train": {"output_dir": spec["out"], "max_steps": spec["steps"], "micro_batch_size": spec["micro_batch"],
                  "lr": spec["lr"], "warmup_steps": 3, "eval_every": 0, "eval_batches": spec["eval_batches"],
                  "save_every": 0, "log_every": 1, "progress": False, "seed": 0},
    }


def child(spec: dict) -> dict:
    import torch

    import distillery
    from distillery.lora import trainable_parameters
    from distillery.students import build_student, count_parameters

    torch.set_num_threads(spec["threads"])
    cfg = distillery.configure(recipe(spec))
    t0 = time.perf_counter()
    result = distillery.distill(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tok_s" in r]
    out = {"phase": spec["phase"], "steps": len(steps), "lr": spec["lr"],
           "kl_teacher_student": result.summary["validation"]["kl_teacher_student"],
           "validation": result.summary["validation"], "tok_s": statistics.median(r["tok_s"] for r in steps[1:]),
           "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3), "train_wall_s": round(wall, 1),
           "kd_first_last": [steps[0]["kd"], steps[-1]["kd"]], "student": str(result.student_dir)}
    if spec["phase"] != "pretrain":
        model = build_student(cfg.student)
        out["trainable_parameters"] = trainable_parameters(model)
        out["student_parameters"] = count_parameters(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--result")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pretrain-steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_lora"))
    args = ap.parse_args()
    if args.child:
        res = child(json.loads(Path(args.child).read_text()))
        Path(args.result).write_text(json.dumps(res))
        return
    import shutil

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    base = {"seq_len": args.seq_len, "micro_batch": 4, "eval_batches": 4, "threads": args.threads, "rank": args.rank}
    runs = {}
    pre = {**base, "phase": "pretrain", "steps": args.pretrain_steps, "lr": 2e-3, "out": str(work / "pretrain")}
    runs["pretrain"] = run_child(Path(__file__), pre, threads=args.threads, timeout=3600, log=work / "log.txt")
    print("pretrain", json.dumps(runs["pretrain"])[:300], flush=True)
    for phase in ("full", "lora"):
        spec = {**base, "phase": phase, "steps": args.steps, "lr": args.lr, "out": str(work / phase),
                "pretrained": runs["pretrain"].get("student", "")}
        runs[phase] = run_child(Path(__file__), spec, threads=args.threads, timeout=3600, log=work / "log.txt")
        print(phase, json.dumps(runs[phase])[:300], flush=True)
    full, lora = runs["full"], runs["lora"]
    summary = {}
    if "error" not in full and "error" not in lora:
        summary = {"kl_start": runs["pretrain"]["kl_teacher_student"], "kl_full": full["kl_teacher_student"],
                   "kl_lora": lora["kl_teacher_student"],
                   "trainable_fraction_lora": lora["trainable_parameters"] / lora["student_parameters"],
                   "tok_s_lora_over_full": lora["tok_s"] / full["tok_s"],
                   "peak_rss_lora_over_full": lora["peak_rss_gb"] / full["peak_rss_gb"]}
    write_json({"machine": machine_info(threads=args.threads), "setup": {**base, "steps": args.steps,
                "pretrain_steps": args.pretrain_steps, "lr": args.lr, "teacher": "SmolLM2-135M-Instruct (fp32)",
                "student": "demo shape pruned from the teacher (8 layers, d=384): 31.9M",
                "data": f"demo:shakespeare, {args.seq_len}-token blocks, micro-batch 4, forward KL"},
                "runs": runs, "summary": summary}, OUT)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

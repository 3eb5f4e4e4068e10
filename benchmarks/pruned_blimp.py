"""How much grammar a pruned student starts with: BLiMP of the teacher pruned to several shapes, before any training.

Issue 16 asks the demo's student (≤ 1/4 of SmolLM2-135M-Instruct, pruned, distilled for ~5 min on 2 cores) to keep
≥ 90 % of the teacher's BLiMP accuracy above chance. This measures where pruning leaves it: each shape is cut from the
teacher by ``distillery.prune.prune_model`` (block-importance depth ranking, calibrated on the bundled Shakespeare as
the demo calibrates on its training text) and scored on the demo's BLiMP sample (10 pairs per paradigm, seeded, the
``<|endoftext|>`` prefix the demo uses). ``--trained FOLDER`` adds trained students (e.g. the demo's KD student) to
the table, scored the same way.

    flock /tmp/distillery-bench.lock .venv/bin/python benchmarks/pruned_blimp.py \\
        --trained runs/bench/demo/kd/student --out benchmarks/results/pruned_blimp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

# name -> prune_model keyword arguments (None = the teacher's own value)
SHAPES = {
    "teacher (30 layers, d=576)": None,
    "demo shape: 8 layers, d=384, FFN 1024, 6 heads": dict(layers=8, hidden=384, ffn=1024, heads=6),
    "8 layers, full width": dict(layers=8),
    "12 layers, full width": dict(layers=12),
    "16 layers, full width": dict(layers=16),
    "30 layers, d=384, FFN 1024, 6 heads": dict(hidden=384, ffn=1024, heads=6),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--per-paradigm", type=int, default=10, help="BLiMP pairs per paradigm (the demo's 10)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--trained", nargs="*", default=[], help="trained student folders to score beside")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/pruned_blimp.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from distillery.prune import prune_model
    from distillery.prune.cli import calibration_batches
    from distillery.tasks.blimp import load_pairs, retained_above_chance, score_blimp
    from distillery.teachers import load_teacher

    machine = common.machine_info(threads=args.threads)
    teacher = load_teacher(args.teacher, device="cpu", dtype="float32")
    tok, model = teacher.tokenizer, teacher.model
    pairs = load_pairs(per_paradigm=args.per_paradigm, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.txt"
        calib_file.write_text(common.corpus("shakespeare8", 200_000))
        calib = calibration_batches([str(calib_file)], tok, seq_len=256, batch_size=4, n_batches=args.calib_batches)

    rows = []

    def score(name: str, m, how: str) -> None:
        with torch.no_grad():
            r = score_blimp(m.eval(), tok, pairs, prefix="<|endoftext|>", progress=False, name=name)
        rows.append({"model": name, "how": how, "parameters": sum(p.numel() for p in m.parameters()),
                     "blimp": r["overall"], "per_field": r["per_field"], "seconds": r["seconds"]})
        print(json.dumps({k: rows[-1][k] for k in ("model", "parameters", "blimp")}), flush=True)

    for name, kw in SHAPES.items():
        if kw is None:
            score(name, model, "the teacher")
            continue
        t0 = time.perf_counter()
        student = prune_model(model, calib, **kw)
        score(name, student, f"pruned, untrained ({time.perf_counter() - t0:.1f} s incl. scoring)")
        del student
    for folder in args.trained:
        score(folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), "trained student folder")

    t_acc = rows[0]["blimp"]
    for r in rows:
        r["kept_above_chance"] = retained_above_chance(r["blimp"], t_acc)
    machine["load_average_end"] = common.loadavg()
    common.write_json({"benchmark": "pruned_blimp", "machine": machine, "teacher": args.teacher,
                       "pairs": len(pairs), "per_paradigm": args.per_paradigm, "prefix": "<|endoftext|>",
                       "calibration": f"{args.calib_batches} x 4 x 256 tokens of the bundled Shakespeare",
                       "rows": rows,
                       "limits": "one BLiMP sample (10 pairs per paradigm; a pair is 1/670 of the score, so "
                                 "differences under ~0.03 are within sampling noise); untrained rows only say "
                                 "where training starts"}, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

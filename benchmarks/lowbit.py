"""Low-bit students: 3- and 2-bit post-training quantization vs QAT with distillation, same start weights.

From one distilled student (``--base``, trained here first when the folder is missing), for each bit
width ``b`` in ``--bits``:

* **PTQ**: ``quantize_model(base, bits=b)``: MLX's affine grid (``mx.quantize``, groups of
  ``--group-size``), every linear layer and the tied embedding / LM head, as ``mlx_lm.convert -q``
  does; and the same after a per-group range search (``clip="mse"``), a stronger PTQ;
* **QAT**: ``distillery distill`` from the base weights (``student.init=pretrained``) with
  ``qat.enabled`` for the whole run (``qat.last_steps = train.max_steps = --qat-steps``): forward KL to
  the live teacher through the fake-quantized weights (straight-through gradient), then
  ``quantize_model`` of the result: the weights the runtime runs, equal to what training saw;
* **QAT + clip** (``--qat-clip mse``): the same run with the per-group range search inside the fake
  quantizer (``qat_wrap(clip="mse")``, written into the weights at the end). train.py calls
  ``qat_wrap(student, bits, group_size)`` and has no recipe key for it yet, so this script passes
  ``clip`` by wrapping ``distillery.quantize.qat_wrap`` for that run (nothing else changes);
* the QAT run's latent fp32 weights are evaluated as well, to show how much of the gain is the
  quantizer and how much is the extra training.

Two processes can share the work (``--bits 3 --out a.json`` and ``--bits 2 --out b.json``), then
``--merge a.json b.json`` writes the combined result.

Every model is scored by ``distillery.evaluate.run_eval`` against the teacher on held-out text
(``demo:milton``: never trained on): perplexity, KL(teacher ‖ student), top-1 agreement; the change
of perplexity is relative to the fp32 base. Goals (issue 19): 3-bit QAT within 5 % of fp32 perplexity,
2-bit within 15 %, with PTQ far off. Runs use one thread (``--threads``) and short step counts.

    .venv/bin/python benchmarks/lowbit.py [--quick] [--base runs/lowbit/base/student] [--qat-steps 40]

Results go to ``benchmarks/results/lowbit.json`` (``lowbit_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, machine_info, write_json
import distillery.quantize
from distillery.config import load_config
from distillery.evaluate import run_eval
from distillery.quantize import quantize_model
from distillery.train import distill

GOALS_PCT = {3: 5.0, 2: 15.0}  # QAT perplexity within this % of fp32 (issue 19)
LIMITS = ("CPU only, one thread, shared machine; short runs (base and QAT step counts in settings); the QAT runs "
          "train qat_steps more steps than the base, the latent_fp32 rows show that extra training alone; every "
          "linear layer and the tied embedding / LM head quantized (as mlx_lm.convert -q).")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "configs" / "smollm2_student.yaml"))
    p.add_argument("--base", default="runs/lowbit/base/student", help="trained student folder (made if missing)")
    p.add_argument("--base-steps", type=int, default=100, help="steps of the base run when --base is missing")
    p.add_argument("--work-dir", default="runs/lowbit")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--qat-steps", type=int, default=40)
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128, help="training and evaluation block length")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of --seq-len tokens")
    p.add_argument("--eval-data", default="demo:milton")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--qat-clip", nargs="+", choices=("none", "mse"), default=["none"],
                   help="QAT variants; 'mse' searches every forward and is slow on a 49k-row embedding on CPU")
    p.add_argument("--merge", nargs="+", default=None, help="combine result files of runs split by --bits")
    p.add_argument("--base-command", default=None, help="with --merge: how --base was made, when made outside")
    p.add_argument("--quick", action="store_true", help="10 QAT steps, 8 eval blocks, 30 base steps if made")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/lowbit[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.qat_steps, args.eval_blocks, args.base_steps = min(args.qat_steps, 10), min(args.eval_blocks, 8), 30
    return args


def _train_overrides(args, out: Path, steps: int) -> list[str]:
    return [f"train.output_dir={out}", f"train.max_steps={steps}", f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch}", "train.eval_every=0", f"train.save_every={steps}",
            "train.progress=false"]


def _distill(args, overrides: list[str], clip: str = "none") -> float:
    t0 = time.perf_counter()
    with _qat_clip(clip):
        distill(load_config(args.recipe, overrides))
    return time.perf_counter() - t0


@contextlib.contextmanager
def _qat_clip(clip: str):
    """train.py imports ``qat_wrap`` from ``distillery.quantize`` when QAT starts: hand it ``clip``."""
    if clip == "none":
        yield
        return
    from distillery.quantize.qat import qat_wrap
    distillery.quantize.qat_wrap = functools.partial(qat_wrap, clip=clip)
    try:
        yield
    finally:
        del distillery.quantize.qat_wrap  # back to the package's lazy attribute


def _score(args, name: str, folder: Path, fp32_ppl: float | None) -> dict:
    m = run_eval(args.teacher, str(folder), [args.eval_data], seq_len=args.seq_len, batch_size=4,
                 max_blocks=args.eval_blocks, progress=False)
    row = {"model": name, "folder": str(folder), "perplexity": m["student_perplexity"],
           "kl_teacher_student": m["kl_teacher_student"], "top1_agreement": m["top1_agreement"],
           "tokens": m["tokens"], "teacher_perplexity": m["teacher_perplexity"]}
    if fp32_ppl is not None:
        row["ppl_change_pct"] = 100 * (row["perplexity"] / fp32_ppl - 1)
    print(f"{name:>18}: ppl {row['perplexity']:.3f}  KL {row['kl_teacher_student']:.4f}  "
          f"top1 {row['top1_agreement']:.3f}" + (f"  {row['ppl_change_pct']:+.1f}%" if fp32_ppl else ""), flush=True)
    return row


def _goals(rows: list[dict], bits_list: list[int]) -> dict:
    """Per bit width: the best QAT variant's perplexity change against the goal, beside PTQ's."""
    goals = {}
    for b in bits_list:
        qat = [r for r in rows if r["model"] in (f"qat{b}", f"qat{b}_clip_mse")]
        best = min(qat, key=lambda r: r["perplexity"])
        latent = next(r for r in rows if r["model"] == best["model"] + "_latent_fp32")
        goals[f"{b}bit"] = {"goal_ppl_change_pct_max": GOALS_PCT.get(b), "best_qat": best["model"],
                            "qat_ppl_change_pct": best["ppl_change_pct"],
                            "qat_vs_own_fp32_latent_pct": 100 * (best["perplexity"] / latent["perplexity"] - 1),
                            "ptq_ppl_change_pct": {r["model"]: r["ppl_change_pct"] for r in rows
                                                   if r["model"] in (f"ptq{b}", f"ptq{b}_clip_mse")},
                            "met": GOALS_PCT.get(b) is not None and best["ppl_change_pct"] <= GOALS_PCT[b],
                            # the premise: plain PTQ (MLX min/max grid) misses the same bound
                            "ptq_far_off": GOALS_PCT.get(b) is not None and next(
                                r for r in rows if r["model"] == f"ptq{b}")["ppl_change_pct"] > GOALS_PCT[b]}
    return goals


def _merge(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    merged = {**parts[0], "parts": [{"file": f, "machine": p["machine"]} for f, p in zip(args.merge, parts)]}
    rows = {}
    for p in parts:
        rows.update({r["model"]: r for r in p["rows"]})
        for key in ("timings_s", "qat_commands"):
            merged[key] = {**merged.get(key, {}), **p.get(key, {})}
    merged["rows"] = list(rows.values())
    bits = sorted({b for p in parts for b in p["settings"]["bits"]}, reverse=True)
    merged["settings"]["bits"] = bits
    merged["goals"] = _goals(merged["rows"], bits)
    merged["limits"] = LIMITS
    if args.base_command:
        merged["base_command"] = args.base_command
    out = Path(args.out) if args.out else RESULTS / "lowbit.json"
    write_json(merged, out)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return _merge(args)
    torch.set_num_threads(args.threads)
    args.teacher = load_config(args.recipe, []).teacher  # the recipe's teacher scores every model
    work, base = Path(args.work_dir), Path(args.base)
    command = shlex.join([".venv/bin/python", "benchmarks/lowbit.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": machine_info(command.split(), threads=args.threads),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "teacher")},
              "teacher": args.teacher.source, "timings_s": {}}
    if not (base / "config.json").is_file():
        base_run = base.parent
        result["base_command"] = shlex.join([".venv/bin/python", "-m", "distillery.cli", "distill", args.recipe,
                                             *_train_overrides(args, base_run, args.base_steps)])
        result["timings_s"]["base"] = _distill(args, _train_overrides(args, base_run, args.base_steps))
    rows = [_score(args, "fp32", base, None)]
    fp32_ppl = rows[0]["perplexity"]
    for bits in args.bits:
        for clip, name in (("none", f"ptq{bits}"), ("mse", f"ptq{bits}_clip_mse")):
            ptq = quantize_model(base, bits=bits, group_size=args.group_size, out_dir=work / name, eval_tokens=0,
                                 clip=clip)
            rows.append(_score(args, name, Path(ptq["out_dir"]), fp32_ppl))
        for clip in args.qat_clip:
            name = f"qat{bits}" + ("" if clip == "none" else f"_clip_{clip}")
            overrides = [*_train_overrides(args, work / name, args.qat_steps), "student.init=pretrained",
                         f"student.pretrained={base}", "qat.enabled=true", f"qat.bits={bits}",
                         f"qat.group_size={args.group_size}", f"qat.last_steps={args.qat_steps}",
                         f"train.lr={args.qat_lr}", f"train.warmup_steps={max(1, args.qat_steps // 10)}"]
            result.setdefault("qat_commands", {})[name] = shlex.join(
                [".venv/bin/python", "-m", "distillery.cli", "distill", args.recipe, *overrides]) + (
                "" if clip == "none" else f"  # with qat_wrap(clip='{clip}'), passed by this script")
            result["timings_s"][name] = _distill(args, overrides, clip)
            rows.append(_score(args, f"{name}_latent_fp32", work / name / "student", fp32_ppl))
            q = quantize_model(work / name / "student", bits=bits, group_size=args.group_size,
                               out_dir=work / f"{name}-q", eval_tokens=0)   # plain grid: what training saw
            rows.append(_score(args, name, Path(q["out_dir"]), fp32_ppl))
    result["rows"] = rows
    result["goals"] = _goals(rows, args.bits)
    result["limits"] = LIMITS
    out = Path(args.out) if args.out else RESULTS / ("lowbit_quick.json" if args.quick else "lowbit.json")
    write_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
* the QAT run's latent fp32 weights are evaluated as well, and (``--control``, default on) the same
  distillation run *without* QAT from the same base, ``fp32_kd``: the fp32 student given exactly the
  QAT runs' extra training. The QAT student is compared with both the base and this control, so
  the gain of QAT is not confused with the gain of more distillation.
* **in MLX**: every row is also exported with ``export_model(..., "mlx")`` (``f32`` for fp32 rows,
  ``q<b>`` with ``--group-size`` for the quantized ones: MLX re-quantizes the grid values, landing on
  the same weights), verified there (MLX vs torch on the file's dequantized weights, KV cache, greedy
  tokens) and scored by MLX itself on the same held-out blocks (``bench.quality.perplexity_windows``):
  the runtime runs what we claim. The goals are judged on the MLX perplexities.
* ``--embedding-bits N``: the input embedding and the LM head (tied here: 80 % of the SmolLM2 student's weights)
  at N bits beside ``b``-bit layers, in the PTQ, the QAT runs (``qat.embedding_bits``) and the MLX files (mixed
  widths through ``mlx_lm.convert``'s ``quant_predicate``); rows ``ptq3_e4``, ``qat3_e4``, ... Every quantized
  row records the MLX file's ``bits_per_weight`` (all stored bytes × 8 / parameters).
* ``--control-from FILE``: the control row ``fp32_kd`` taken from an earlier result of the same settings (base,
  steps, lr, data, eval blocks; the control is deterministic for them) instead of training it again; the
  settings say so, and the goals are judged against it.

Two processes can share the work (``--bits 3 --out a.json`` and ``--bits 2 --out b.json``), then
``--merge a.json b.json`` writes the combined result.

Every model is scored by ``distillery.evaluate.run_eval`` against the teacher on held-out text
(``demo:milton``: never trained on): perplexity, KL(teacher ‖ student), top-1 agreement; the change
of perplexity is relative to the fp32 base (and to ``fp32_kd``). Goals (issue 19): 3-bit QAT within 5 % of fp32 perplexity,
2-bit within 15 %, with PTQ far off. Runs use one thread (``--threads``) and short step counts.

    .venv/bin/python benchmarks/lowbit.py [--quick] [--base runs/lowbit/base/student] [--qat-steps 40]
    .venv/bin/python benchmarks/lowbit.py --base runs/bench/device_student --qat-steps 120 --threads 2

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
from distillery.bench.quality import open_scorer, perplexity_windows
from distillery.config import DataConfig, load_config
from distillery.errors import DistilleryError
from distillery.evaluate import run_eval
from distillery.export import export_model
from distillery.quantize import quantize_model
from distillery.train import distill

GOALS_PCT = {3: 5.0, 2: 15.0}  # QAT perplexity within this % of fp32 (issue 19)
LIMITS = ("CPU only, shared machine; short runs (base and QAT step counts in settings); the QAT runs "
          "train qat_steps more steps than the base: fp32_kd is the same run without QAT (the fair fp32 "
          "reference), latent_fp32 the QAT run's unquantized weights; every linear layer and the tied "
          "embedding / LM head quantized (as mlx_lm.convert -q); the mlx entries are MLX's own CPU build "
          "(mlx[cpu] on Linux x86-64), not Apple silicon; with settings.embedding_bits the embedding / LM head "
          "are at that width instead (rows named _e<N>).")
CONTROL_KEYS = ("base", "qat_steps", "qat_lr", "seq_len", "micro_batch", "eval_blocks", "eval_data", "recipe", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "configs" / "smollm2_student.yaml"))
    p.add_argument("--base", default="runs/lowbit/base/student", help="trained student folder (made if missing)")
    p.add_argument("--base-steps", type=int, default=100, help="steps of the base run when --base is missing")
    p.add_argument("--work-dir", default="runs/lowbit")
    p.add_argument("--bits", type=int, nargs="*", default=[3, 2], help="none (bare --bits): the fp32 control only")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--scheme", choices=["auto", "affine"], default="auto", help="'affine': MLX's grid at 4 and 8 "
                   "bits too (a uniform q4 student); 'auto': GGUF's symmetric grid there")
    p.add_argument("--qat-steps", type=int, default=40)
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128, help="training and evaluation block length")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of --seq-len tokens")
    p.add_argument("--eval-data", default="demo:milton")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run (data order): repeat a result")
    p.add_argument("--qat-clip", nargs="+", choices=("none", "mse"), default=["none"],
                   help="QAT variants; 'mse' searches every forward and is slow on a 49k-row embedding on CPU")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the QAT recipe without QAT (fp32_kd): the fp32 student with the same extra training")
    p.add_argument("--control-from", default=None, metavar="FILE",
                   help="with --no-control: take the fp32_kd row from this earlier result of the same settings")
    p.add_argument("--embedding-bits", type=int, default=None, choices=(2, 3, 4, 6, 8),
                   help="bits of the embedding / LM head (default: --bits); rows get the suffix _e<N>")
    p.add_argument("--mlx", action=argparse.BooleanOptionalAction, default=True,
                   help="export every row to MLX, verify it there and score its perplexity in MLX")
    p.add_argument("--rescore-mlx", metavar="FILE", help="redo the MLX entries (and goals) of a finished result file")
    p.add_argument("--merge", nargs="+", default=None, help="combine result files of runs split by --bits")
    p.add_argument("--base-command", help="with --merge: how --base was made, when made outside")
    p.add_argument("--quick", action="store_true", help="10 QAT steps, 8 eval blocks, 30 base steps if made")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/lowbit[_quick].json)")
    args = p.parse_args(argv)
    if args.control_from and args.control:
        p.error("--control-from replaces the control run: add --no-control")
    if args.quick:
        args.qat_steps, args.eval_blocks, args.base_steps = min(args.qat_steps, 10), min(args.eval_blocks, 8), 30
    return args


def _train_overrides(args, out: Path, steps: int) -> list[str]:
    return [f"train.output_dir={out}", f"train.max_steps={steps}", f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch}", "train.eval_every=0", f"train.save_every={steps}",
            # the run's own closing val: short, the rows score
            "train.progress=false", "data.max_val_blocks=8", f"train.seed={args.seed}"]


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


def _eval_blocks(args, folder: Path) -> list[list[int]]:
    """The held-out blocks ``run_eval`` scores, as token lists of ``seq_len + 1`` ids (inputs + last label)."""
    from transformers import AutoTokenizer

    from distillery.data import build_datasets

    cfg = DataConfig(train=[args.eval_data], seq_len=args.seq_len, val_fraction=0.0, max_train_blocks=args.eval_blocks)
    ds = build_datasets(cfg, AutoTokenizer.from_pretrained(folder), progress=False).train
    b = ds.batch(torch.arange(len(ds)))
    return [ids.tolist() + [int(lab[-1])] for ids, lab in zip(b["input_ids"], b["labels"])]


def _mlx_source(name: str, by_name: dict[str, dict], base: Path) -> tuple[Path | None, int | None]:
    """What ``mlx_lm.convert`` converts for row ``name``, and at how many bits: the *fp32* weights the row's
    grid is a function of (the affine grid is not idempotent, so MLX must not re-quantize our dequantized
    values: docs/export.md). fp32 rows: themselves; ``ptq<b>``: the base; ``qat<b>``: its latent fp32
    student. ``ptq<b>_clip_mse``'s clamped weights are not saved, so it has no MLX row (None)."""
    if name.endswith("_clip_mse") and name.startswith("ptq"):
        return None, None
    if name.startswith("ptq"):
        return base, int(name[3:].split("_")[0])
    if name.startswith("qat") and not name.endswith("_latent_fp32"):
        bits = int(name[3:].split("_")[0])
        return Path(by_name[f"{name}_latent_fp32"]["folder"]), bits
    return Path(by_name[name]["folder"]) if name in by_name else None, None


def _mlx(args, name: str, source: Path, bits: int | None, torch_ppl: float) -> dict:
    """Convert ``source`` to MLX (``q<bits>``, groups of ``--group-size``; f32 when ``bits`` is None), verify it
    in MLX, and score its perplexity there on the held-out blocks; ``torch_ppl``: the same row in torch (on our
    quantized folder), which MLX must reproduce when its grid is ours."""
    quant = "f32" if bits is None else f"q{bits}"
    out = Path(args.work_dir) / "mlx" / name
    emb = None if bits is None else getattr(args, "embedding_bits", None)
    row = {"quant": quant, "group_size": None if bits is None else args.group_size, "source": str(source),
           "folder": str(out)}
    try:
        rep = export_model(source, "mlx", out, quant=quant, group_size=args.group_size, verify_tokens=256,
                           embedding_bits=emb)
    except DistilleryError as exc:      # a failed parity check is a result: record it, score nothing
        return {**row, "verified": False, "error": str(exc)}
    ver = rep["verification"]
    row.update(embedding_bits=rep.get("embedding_bits"), bits_per_weight=rep.get("bits_per_weight"),
               parameters=rep.get("parameters"))
    row.update(verified=ver["passed"], bytes=rep["bytes"], parity_max_abs_diff=ver["max_abs_diff"],
               kv_cache_max_abs_diff=ver["kv_cache_max_abs_diff"], greedy_identical=ver["greedy_identical"])
    with open_scorer("mlx", out, args.threads, max_tokens=args.seq_len + 1) as logits:
        row["perplexity"] = perplexity_windows(logits, args.blocks)["perplexity"]
    row["vs_torch_ppl_rel"] = row["perplexity"] / torch_ppl - 1     # ~1e-6: MLX runs exactly our grid
    return row


def _add_mlx(args, row: dict, by_name: dict[str, dict], base: Path, ref: dict | None) -> None:
    """Fill ``row["mlx"]`` (see :func:`_mlx_source`); changes relative to ``ref``'s MLX perplexity."""
    source, bits = _mlx_source(row["model"], by_name, base)
    if source is None:
        row["mlx"] = {"skipped": "the clamped fp32 weights of a clip=mse PTQ are not saved; torch row only"}
        return
    row["mlx"] = _mlx(args, row["model"], source, bits, row["perplexity"])
    if ref is not None and "perplexity" in row["mlx"] and "perplexity" in ref.get("mlx", {}):
        row["mlx"]["ppl_change_pct"] = 100 * (row["mlx"]["perplexity"] / ref["mlx"]["perplexity"] - 1)


def _score(args, name: str, folder: Path, base: dict | None, rows: list[dict]) -> dict:
    """Score one model against the teacher in torch (``run_eval``) and, with ``--mlx``, in MLX; changes of
    perplexity are relative to ``base`` (the fp32 base's row; None for the base itself)."""
    m = run_eval(args.teacher, str(folder), [args.eval_data], seq_len=args.seq_len, batch_size=4,
                 max_blocks=args.eval_blocks, progress=False)
    row = {"model": name, "folder": str(folder), "perplexity": m["student_perplexity"],
           "kl_teacher_student": m["kl_teacher_student"], "top1_agreement": m["top1_agreement"],
           "tokens": m["tokens"], "teacher_perplexity": m["teacher_perplexity"]}
    if base is not None:
        row["ppl_change_pct"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
    if args.mlx:
        _add_mlx(args, row, {r["model"]: r for r in [*rows, row]}, Path(args.base), base)
    _print_row(row, base is not None)
    return row


def _print_row(row: dict, relative: bool) -> None:
    mlx = row.get("mlx", {})
    print(f"{row['model']:>18}: ppl {row['perplexity']:.3f}  KL {row['kl_teacher_student']:.4f}  "
          f"top1 {row['top1_agreement']:.3f}" + (f"  {row['ppl_change_pct']:+.1f}%" if relative else "")
          + (f"  | MLX {mlx['quant']} ppl {mlx['perplexity']:.3f}" if "perplexity" in mlx else "")
          + (f" {mlx['bits_per_weight']:.3f} bits/w" if mlx.get("bits_per_weight") else "")
          + (f" {mlx['ppl_change_pct']:+.1f}%" if "ppl_change_pct" in mlx else "")
          + ("  MLX VERIFICATION FAILED" if mlx.get("verified") is False else ""), flush=True)


def _rescore_mlx(args) -> int:
    """Redo every row's MLX entry of a finished result file (``--rescore-mlx FILE``) and its goals."""
    path = Path(args.rescore_mlx)
    result = json.loads(path.read_text())
    for key in ("base", "work_dir", "group_size", "seq_len", "eval_blocks", "eval_data"):
        setattr(args, key, result["settings"][key])
    args.embedding_bits = result["settings"].get("embedding_bits")
    torch.set_num_threads(args.threads)
    args.blocks = _eval_blocks(args, Path(args.base))
    rows, by_name = result["rows"], {r["model"]: r for r in result["rows"]}
    for row in rows:
        _add_mlx(args, row, by_name, Path(args.base), None if row["model"] == "fp32" else by_name["fp32"])
        _print_row(row, row["model"] != "fp32")
    result["goals"] = _goals(rows, result["settings"]["bits"], _tag(args.embedding_bits))
    result["mlx_rescored"] = {"command": shlex.join([".venv/bin/python", "benchmarks/lowbit.py", "--rescore-mlx",
                                                     str(path), "--threads", str(args.threads)]),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine_info(threads=args.threads)}
    write_json(result, path)
    print(f"rewrote {path}")
    return 0


def _ppl(row: dict) -> float:
    """The perplexity a goal is judged on: MLX's where the row was run there, else torch's."""
    return row.get("mlx", {}).get("perplexity", row["perplexity"])


def _tag(embedding_bits: int | None) -> str:
    """Row-name suffix of an ``--embedding-bits`` run: ``_e4`` (``qat3_e4``); empty without one."""
    return "" if embedding_bits is None else f"_e{embedding_bits}"


def _control_from(args) -> dict:
    """The ``fp32_kd`` row of ``--control-from FILE``, refused unless FILE was run with these settings."""
    path = Path(args.control_from)
    try:
        old = json.loads(path.read_text())
        row = next(r for r in old["rows"] if r["model"] == "fp32_kd")
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise DistilleryError(f"--control-from {path}: no fp32_kd row readable there ({exc})") from None
    ours = {k: str(getattr(args, k)) for k in CONTROL_KEYS}
    theirs = {k: str(old["settings"].get(k, 0 if k == "seed" else None)) for k in CONTROL_KEYS}  # before --seed: 0
    if ours != theirs:
        diff = {k: (theirs[k], ours[k]) for k in CONTROL_KEYS if ours[k] != theirs[k]}
        raise DistilleryError(f"--control-from {path}: its control ran with other settings {diff}")
    return {**row, "from_file": str(path)}


def _goals(rows: list[dict], bits_list: list[int], tag: str = "") -> dict:
    """Per bit width: the best QAT variant's perplexity change against the goal, beside PTQ's; in MLX when run.

    ``qat_ppl_change_pct`` is against the fp32 base; ``qat_vs_fp32_kd_pct`` against the control (the fp32
    student given the same extra distillation), the fair reference when the QAT runs improved the base."""
    by = {r["model"]: r for r in rows}
    fp32, control = _ppl(by["fp32"]), by.get("fp32_kd")
    goals = {"judged_in": "mlx" if "mlx" in by["fp32"] else "torch"}
    for b in bits_list:
        qat = [r for r in rows if r["model"] in (f"qat{b}{tag}", f"qat{b}{tag}_clip_mse")]
        best = min(qat, key=_ppl)
        latent = by[best["model"] + "_latent_fp32"]
        change = 100 * (_ppl(best) / fp32 - 1)
        vs_control = None if control is None else 100 * (_ppl(best) / _ppl(control) - 1)
        ptq = {n: 100 * (_ppl(by[n]) / fp32 - 1) for n in (f"ptq{b}{tag}", f"ptq{b}{tag}_clip_mse") if n in by}
        goal = GOALS_PCT.get(b)
        goals[f"{b}bit"] = {"goal_ppl_change_pct_max": goal, "best_qat": best["model"],
                            "qat_ppl_change_pct": change, "qat_vs_fp32_kd_pct": vs_control,
                            "qat_vs_own_fp32_latent_pct": 100 * (_ppl(best) / _ppl(latent) - 1),
                            "ptq_ppl_change_pct": ptq,
                            "met_vs_base": goal is not None and change <= goal,
                            "met_vs_fp32_kd": goal is not None and vs_control is not None and vs_control <= goal,
                            # the premise: plain PTQ (MLX min/max grid) misses the same bound
                            "bits_per_weight": best.get("mlx", {}).get("bits_per_weight"),
                            "ptq_far_off": goal is not None and ptq[f"ptq{b}{tag}"] > goal}
    return goals


def _merge(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    merged = {**parts[0], "parts": [{"file": f, "machine": p["machine"]} for f, p in zip(args.merge, parts)]}
    rows = {}
    for f, p in zip(args.merge, parts):
        rows.update({r["model"]: r for r in p["rows"]})
        if f != args.merge[0] and any(r["model"] == "fp32_kd" for r in p["rows"]):  # a later control wins
            merged["settings"] = {**merged["settings"], "control_note": f"fp32_kd from {f} (merged)"}
        for key in ("timings_s", "qat_commands"):
            merged[key] = {**merged.get(key, {}), **p.get(key, {})}
    merged["rows"] = list(rows.values())
    merged["settings"]["bits"] = bits = sorted({b for p in parts for b in p["settings"]["bits"]}, reverse=True)
    merged["goals"] = _goals(merged["rows"], bits, _tag(merged["settings"].get("embedding_bits")))
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
    if args.rescore_mlx:
        return _rescore_mlx(args)
    torch.set_num_threads(args.threads)
    args.teacher = load_config(args.recipe, []).teacher  # the recipe's teacher scores every model
    work, base = Path(args.work_dir), Path(args.base)
    command = shlex.join([".venv/bin/python", "benchmarks/lowbit.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": machine_info(command.split(), threads=args.threads),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "teacher", "blocks")},
              "teacher": args.teacher.source, "timings_s": {}}
    if not (base / "config.json").is_file():
        base_run = base.parent
        result["base_command"] = shlex.join([".venv/bin/python", "-m", "distillery.cli", "distill", args.recipe,
                                             *_train_overrides(args, base_run, args.base_steps)])
        result["timings_s"]["base"] = _distill(args, _train_overrides(args, base_run, args.base_steps))
    args.blocks = _eval_blocks(args, base) if args.mlx else None
    rows = [_score(args, "fp32", base, None, [])]
    ref = rows[0]
    recipe = ["student.init=pretrained", f"student.pretrained={base}", f"train.lr={args.qat_lr}",
              f"train.warmup_steps={max(1, args.qat_steps // 10)}"]   # every run below: same start, data, steps
    runs = [(None, "none", "fp32_kd")] if args.control else []
    tag, emb = _tag(args.embedding_bits), args.embedding_bits
    if args.control_from:      # the control is deterministic for these settings: reuse it, say so in settings
        rows.append(_control_from(args))
        result["settings"]["control_note"] = (f"fp32_kd not rerun: its row is taken from {args.control_from} "
                                              "(same base, steps, lr, data and eval blocks)")
    runs += [(b, clip, f"qat{b}{tag}" + ("" if clip == "none" else f"_clip_{clip}"))
             for b in args.bits for clip in args.qat_clip]
    for bits in args.bits:
        for clip, name in (("none", f"ptq{bits}{tag}"), ("mse", f"ptq{bits}{tag}_clip_mse")):
            ptq = quantize_model(base, bits=bits, group_size=args.group_size, out_dir=work / name, eval_tokens=0,
                                 clip=clip, embedding_bits=emb, scheme=args.scheme)
            rows.append(_score(args, name, Path(ptq["out_dir"]), ref, rows))
    for bits, clip, name in runs:
        overrides = [*_train_overrides(args, work / name, args.qat_steps), *recipe]
        if bits is not None:
            overrides += ["qat.enabled=true", f"qat.bits={bits}", f"qat.group_size={args.group_size}",
                          f"qat.last_steps={args.qat_steps}", f"qat.scheme={args.scheme}"] + (
                          [f"qat.embedding_bits={emb}"] if emb else [])
        result.setdefault("qat_commands", {})[name] = shlex.join(
            [".venv/bin/python", "-m", "distillery.cli", "distill", args.recipe, *overrides]) + (
            "" if clip == "none" else f"  # with qat_wrap(clip='{clip}'), passed by this script")
        result["timings_s"][name] = _distill(args, overrides, clip)
        if bits is None:      # the control: the fp32 student trained exactly as the QAT runs are
            rows.append(_score(args, name, work / name / "student", ref, rows))
            continue
        rows.append(_score(args, f"{name}_latent_fp32", work / name / "student", ref, rows))
        q = quantize_model(work / name / "student", bits=bits, group_size=args.group_size, embedding_bits=emb,
                           out_dir=work / f"{name}-q", eval_tokens=0, scheme=args.scheme)   # plain grid: what training saw
        rows.append(_score(args, name, Path(q["out_dir"]), ref, rows))
    result["rows"] = rows
    result["goals"] = _goals(rows, args.bits, tag)
    result["limits"] = LIMITS
    out = Path(args.out) if args.out else RESULTS / ("lowbit_quick.json" if args.quick else "lowbit.json")
    write_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

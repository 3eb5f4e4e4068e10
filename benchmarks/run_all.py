"""Run every benchmark script that exists, one after another: ``make bench`` / ``make bench-quick``.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only throughput,quality] [--skip device]

Order: throughput, quality, loss_memory, cache, device, api_throughput, generate_speed. A script that
is not there is listed as absent; ``--quick`` is passed to each script whose ``--help`` offers it (the
others run at their own default size). ``device.py`` gets ``--student``: the quality benchmark's
pruned KD student if it exists, else the demo's (``runs/demo/kd/student``), else it is skipped. One
failing script does not stop the others; the exit status is 1 if any failed. A summary (status,
minutes per script) is written to ``benchmarks/results/run_all[_quick].json`` and a Markdown table of
the throughput and quality results (for the README) to ``benchmarks/results/SUMMARY[_quick].md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ORDER = ["throughput", "quality", "loss_memory", "cache", "device", "api_throughput", "generate_speed"]
HERE = Path(__file__).resolve().parent


def accepts(script: Path, flag: str) -> bool:
    """Whether ``script --help`` mentions ``flag`` (scripts parse their arguments before heavy imports)."""
    try:
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                              cwd=common.ROOT)
    except subprocess.TimeoutExpired:
        return False
    return flag in proc.stdout


def student_for_device() -> Path | None:
    """A trained student folder for the device benchmark, if a run has made one."""
    for folder in (common.ROOT / "runs" / "bench" / "quality" / "kd_pruned" / "student",
                   common.ROOT / "runs" / "demo" / "kd" / "student"):
        if (folder / "config.json").is_file():
            return folder
    return None


def command(name: str, quick: bool) -> tuple[list[str] | None, str]:
    """The command line for one script, or (None, why it is skipped)."""
    script = HERE / f"{name}.py"
    if not script.is_file():
        return None, "absent"
    cmd = [sys.executable, str(script)]
    if quick:
        if accepts(script, "--quick"):
            cmd.append("--quick")
        else:
            print(f"[run_all] {name}.py has no --quick: running its default size", flush=True)
    if name == "device":
        student = student_for_device()
        if student is None:
            return None, "no student to export (run quality.py or `make demo` first)"
        cmd += ["--student", str(student)]
    return cmd, ""


def markdown_summary(quick: bool) -> str:
    """A results table (Markdown) from throughput and quality JSON, for the README."""
    suffix = "_quick" if quick else ""
    lines = [f"# Benchmark results{' (quick sizes: smoke numbers, not results)' if quick else ''}", ""]
    tp = common.RESULTS / f"throughput{suffix}.json"
    if tp.is_file():
        data = json.loads(tp.read_text())
        m = data["machine"]
        lines += [f"## throughput ({m['cpu']}, {m.get('threads')} threads, torch {m['torch']}, trl {m.get('trl')}, {m['date']})",
                  "", f"`{m['command']}`", ""]
        for name, pair in data["pairs"].items():
            lines += [f"**{name} pair** (batch {data['settings']['batch']} x {data['settings']['seq_len']})", "",
                      "| system | tok/s | peak RSS | MFU |", "|---|---|---|---|"]
            for sys_name, v in pair["systems"].items():
                tok = f"{v['tok_s']:,.0f}" if v["tok_s"] else "–"
                rss = f"{v['peak_rss_bytes'] / 1e9:.2f} GB" if v["peak_rss_bytes"] else "–"
                lines.append(f"| {sys_name} | {tok} | {rss} | {v['mfu']:.1%} |" if v["mfu"] else f"| {sys_name} | {tok} | {rss} | – |")
            keys = [f"{a}{e}/{b}{e} {m}" for e in ("", "+thp") for a, b, m in
                    (("ours_live", "trl_fair", "tok_s"), ("ours_live", "trl_fair", "rss"), ("ours_cached", "student_ce", "tok_s"))]
            lines += ["", "Ratios (medians over rounds): " + " · ".join(
                f"{k}: {pair['ratios'][k]:.2f}" for k in keys if pair["ratios"].get(k) is not None), ""]
    q = common.RESULTS / f"quality{suffix}.json"
    if q.is_file():
        data = json.loads(q.read_text())
        lines += [f"## quality ({data['teacher']['name']} teacher, {data['machine']['date']})", "",
                  "| run | params | held-out ppl | KL(T‖S) | top-1 | Milton KL | tokens |", "|---|---|---|---|---|---|---|"]
        for name, r in data["runs"].items():
            h, mi = r.get("heldout") or {}, r.get("milton") or {}
            cell = lambda d, k, f="{:.3f}": f.format(d[k]) if d.get(k) is not None else "–"  # noqa: E731
            lines.append(f"| {name} | {(r.get('parameters') or 0) / 1e6:.1f}M | {cell(h, 'student_perplexity', '{:.2f}')} | "
                         f"{cell(h, 'kl_teacher_student')} | {cell(h, 'top1_agreement')} | {cell(mi, 'kl_teacher_student')} | "
                         f"{r.get('tokens_seen') or '–'} |")
        lines += [""] + [f"- {k}: {v}" for k, v in data["verdicts"].items()] + [""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes (passed to each script that has --quick)")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(ORDER))
    ap.add_argument("--skip", default="", help="comma-separated scripts to leave out")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else ORDER) if n not in args.skip.split(",")]
    summary = {"quick": args.quick, "machine": common.machine_info(), "scripts": {}}
    failed = False
    for name in names:
        cmd, why = command(name, args.quick)
        if cmd is None:
            print(f"[run_all] {name}: skipped ({why})", flush=True)
            summary["scripts"][name] = {"status": "skipped", "why": why}
            continue
        print(f"[run_all] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=common.ROOT).returncode
        minutes = (time.perf_counter() - t0) / 60
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        failed |= rc != 0
        summary["scripts"][name] = {"status": status, "minutes": round(minutes, 1), "command": " ".join(cmd[1:])}
        print(f"[run_all] {name}: {status} in {minutes:.1f} min", flush=True)
    out = common.RESULTS / ("run_all_quick.json" if args.quick else "run_all.json")
    common.write_json(summary, out)
    md = common.RESULTS / ("SUMMARY_quick.md" if args.quick else "SUMMARY.md")
    md.write_text(markdown_summary(args.quick))
    print(f"wrote {md}")
    print("\n".join(f"  {n:<16} {s['status']:<18} {s.get('minutes', '')}" for n, s in summary["scripts"].items()))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time ``distillery demo`` (what ``make demo`` runs) and record its numbers with the machine it ran on.

    .venv/bin/python benchmarks/demo.py [--quick] [--threads 2] [--work-dir runs/bench/demo] [--keep]

Runs the demo as a child process in a fresh work folder (``--keep`` reuses one, e.g. to time a second demo
whose teacher answers are cached), measures its wall time, and writes ``benchmarks/results/demo.json``
(``demo_quick.json`` with ``--quick``): the demo's ``results.json`` (teacher and students: held-out and Milton
perplexity/KL, BLiMP, answer fidelity, the goals, answers side by side), the machine (``common.machine_info``)
and the load average before and after: the machine is shared, so a run on a loaded machine says so.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "demo"))
    ap.add_argument("--keep", action="store_true", help="reuse the work folder (cached teacher answers, finished runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work_dir)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "distillery.cli", "demo", "--output-dir", str(work)] + (["--quick"] if args.quick else [])
    machine = common.machine_info(command=cmd, threads=args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=common.child_env(args.threads), cwd=common.ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    machine["load_average_end"] = common.loadavg()
    (work / "demo.log").parent.mkdir(parents=True, exist_ok=True)
    (work / "demo.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    results = json.loads((work / "results.json").read_text())
    record = {"benchmark": "demo", "quick": args.quick, "wall_seconds": wall, "machine": machine,
              "reused_work_dir": args.keep, **results}
    out = Path(args.out or common.RESULTS / ("demo_quick.json" if args.quick else "demo.json"))
    common.write_json(record, out)
    print(json.dumps({"wall_seconds": round(wall), "goals": results.get("goals"), "out": str(out)}, indent=2))


if __name__ == "__main__":
    main()

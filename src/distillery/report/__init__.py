"""``distillery report RUN_DIR [--out report.html]``: one self-contained HTML page from a run's JSON.

The page holds training/validation curves (loss, KL to the teacher, top-1 agreement), a
teacher-vs-student table (parameters, size, perplexity, KL, agreement, tok/s per measured runtime),
a quality-vs-size/speed scatter across the students in a folder of runs, and prompts answered side by
side. Numbers come from the JSON files runs write (``metrics.jsonl``, ``summary.json``,
``config.yaml``, ``results.json``, ``distillery bench --json`` files); pictures are made from them
with matplotlib and embedded as base64 PNGs, so the file can be mailed or opened offline.

* :func:`write_report` — library entry point; returns the path written.
* :func:`add_report_parser` — registers the ``report`` verb on the CLI.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DistilleryError


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of ``run_dir`` (a run or a folder of runs) to ``out`` (default ``RUN_DIR/report.html``)."""
    from .collect import collect
    from .page import render

    root = Path(run_dir)
    if not root.is_dir():
        raise DistilleryError(f"report: '{root}' is not a folder")
    data = collect(root)
    if not data["runs"] and not data["results"]:
        raise DistilleryError(f"report: '{root}' holds no run (no metrics.jsonl, summary.json or results.json in it "
                              "or its sub-folders)")
    path = Path(out) if out is not None else root / "report.html"
    if out is not None:  # the page must not replace what it is made from (metrics.jsonl, summary.json, ...)
        from ..locks import refuse_overwrite

        inputs = {f"the run's {f.name}": f for f in root.rglob("*") if f.is_file() and f.suffix in (".jsonl", ".json", ".yaml", ".safetensors")}
        refuse_overwrite(path, inputs, "report --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(path)
    return path


def _cmd_report(args) -> int:
    path = write_report(args.run_dir, args.out)
    print(path)
    return 0


def add_report_parser(subparsers) -> None:
    """Register ``distillery report RUN_DIR [--out FILE]``."""
    p = subparsers.add_parser("report", help="write a self-contained HTML report (curves, tables, samples) of a run")
    p.add_argument("run_dir", help="a run folder (train.output_dir) or a folder of runs, e.g. runs/demo")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=_cmd_report)

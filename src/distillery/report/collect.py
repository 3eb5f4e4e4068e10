"""Gather what a report shows from a run folder's JSON files (no model is loaded, nothing is run).

A **run** is a folder holding ``metrics.jsonl`` and/or ``summary.json`` (what ``distill`` writes),
usually with ``config.yaml`` and ``student/``. ``RUN_DIR`` may be one run, or a folder of runs (its
sub-folders, two levels deep, e.g. ``runs/demo/{kd,ce}``). Also read when present:

* ``results.json`` (written by ``distillery demo`` and ``benchmarks/quality.py``): teacher parameters,
  per-run held-out / second-corpus metrics, training tok/s, and prompts answered by teacher and student;
* runtime benchmark JSON (``distillery bench --json``, any ``*.json`` in ``RUN_DIR`` or ``RUN_DIR/bench``
  with ``runtime`` and ``models``): decode / prefill tok/s per model folder and runtime.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_problem(rec) -> str | None:
    """Why ``rec`` is not a record ``distill`` writes to ``metrics.jsonl`` (None if it is one): a training
    record has an integer ``step`` and numbers ``loss`` and ``tok_s``; a validation record has ``split: val``
    and numbers (or null) for its metrics."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool) or rec["step"] < 0:
        return "no whole-number 'step'"
    if "split" in rec:
        if rec["split"] != "val":
            return f"split {rec['split']!r} is not 'val'"
        keys = ("kl_teacher_student", "top1_agreement", "student_perplexity", "teacher_perplexity")
        bad = [k for k in keys if rec.get(k) is not None and not _number(rec[k])]
        return f"'{bad[0]}' is not a number" if bad else None
    bad = [k for k in ("loss", "tok_s") if not _number(rec.get(k))]
    if bad:
        return f"'{bad[0]}' is missing or not a number"
    if rec.get("tokens_seen") is not None and not _number(rec["tokens_seen"]):
        return "'tokens_seen' is not a number"
    return None


def read_jsonl(path: Path) -> list[dict]:
    """Records of a run's ``metrics.jsonl``; a line that is not JSON (torn by a kill mid-write) is skipped, a
    JSON line of another shape is a one-line error naming ``file:line`` (:func:`metrics_problem`)."""
    from ..errors import DistilleryError

    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DistilleryError(f"{path}: not UTF-8 text (byte offset {exc.start}): not a metrics file distill wrote") from None
    for lineno, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        problem = metrics_problem(rec)
        if problem:
            raise DistilleryError(f"{path}:{lineno}: not a metrics record of distill ({problem}); remove the line")
        out.append(rec)
    return out


def check_metrics_file(path: Path) -> None:
    """One-line error for a ``metrics.jsonl`` holding a line of another shape (see :func:`read_jsonl`)."""
    read_jsonl(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def safetensors_stats(folder: Path) -> tuple[int | None, int | None]:
    """(parameters, bytes on disk) of the ``*.safetensors`` files in ``folder``, from their headers only."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None, None
    params = size = 0
    for f in files:
        size += f.stat().st_size
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                params += count
    return params, size


def is_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() or (folder / "summary.json").is_file()


def load_run(folder: Path, label: str) -> dict:
    """One run: training records, validation records, final summary, config, student size."""
    metrics = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    train = [m for m in metrics if "tok_s" in m]
    tokens_at = {m["step"]: m.get("tokens_seen") for m in train}
    val = [dict(m, tokens_seen=tokens_at.get(m["step"])) for m in metrics if m.get("split") == "val"]
    cfg = {}
    if (folder / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            from ..errors import DistilleryError

            raise DistilleryError(f"{folder / 'config.yaml'}: not a config distill wrote "
                                  f"({' '.join(str(exc).split())[:120]})") from None
        cfg = cfg if isinstance(cfg, dict) else {}
    params, size = safetensors_stats(folder / "student")
    summary = read_json(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    steady = train[len(train) // 5:] or train
    return {"name": label, "dir": str(folder), "train": train, "val": val, "summary": summary, "config": cfg,
            "parameters": params, "size_bytes": size,
            "train_tok_s": sum(m["tok_s"] for m in steady) / len(steady) if steady else None,
            "objective": objective(cfg)}


def objective(cfg: dict) -> str:
    """A short name of what the run optimised, e.g. 'KD forward_kl', 'CE', 'KD jsd + 0.5 CE, on-policy 0.5'."""
    loss = cfg.get("loss", {}) if isinstance(cfg, dict) else {}
    kd_w, ce_w = loss.get("kd_weight", 1.0), loss.get("ce_weight", 0.0)
    parts = []
    if kd_w:
        parts.append(f"KD {loss.get('kd', 'forward_kl')}" + (f" x{kd_w:g}" if kd_w != 1 else ""))
    if ce_w:
        parts.append("CE" + (f" x{ce_w:g}" if ce_w != 1 else ""))
    text = " + ".join(parts) or "?"
    student = cfg.get("student", {}) if isinstance(cfg, dict) else {}
    if student.get("init") and student.get("init") != "config":
        text += f", {student['init']} init"
    frac = (cfg.get("generation") or {}).get("on_policy_fraction") if isinstance(cfg, dict) else None
    if frac:
        text += f", on-policy {frac:g}"
    return text


def find_runs(root: Path) -> list[dict]:
    """``root`` itself if it is a run, then its sub-folders that are runs (two levels deep)."""
    found = [load_run(root, root.name)] if is_run(root) else []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_run(sub):
            found.append(load_run(sub, sub.name))
        else:
            found += [load_run(s, f"{sub.name}/{s.name}") for s in sorted(p for p in sub.iterdir() if p.is_dir())
                      if is_run(s)]
    return found


def find_bench(root: Path) -> list[dict]:
    """Runtime benchmark results (``distillery bench --json``) under ``root`` and ``root/bench``."""
    out = []
    for folder in (root, root / "bench"):
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            data = read_json(f)
            if isinstance(data, dict) and "runtime" in data and isinstance(data.get("models"), list):
                out.append(data)
    return out


def bench_speeds(bench: list[dict]) -> dict[str, dict[str, float]]:
    """``{resolved model path: {runtime: decode tok/s (median)}}``."""
    speeds: dict[str, dict[str, float]] = {}
    for result in bench:
        for model in result["models"]:
            decode = model.get("summary", {}).get("decode_tok_s", {}).get("median")
            if decode is not None:
                key = str(Path(model["path"]).resolve())
                speeds.setdefault(key, {})[result["runtime"]] = decode
    return speeds


SAMPLE_RUNTIME = "torch, greedy sample"  # decode speed measured while answering the report's prompt


def sample_list(results: dict | None) -> list[dict]:
    """Prompts answered by teacher and student: ``results['sample']`` (demo) then ``results['samples']``."""
    results = results or {}
    return ([results["sample"]] if results.get("sample") else []) + list(results.get("samples") or [])


def collect(run_dir: str | Path) -> dict:
    """Everything the page shows, as plain data: ``runs``, ``results`` (or None), ``bench``, ``speeds``."""
    root = Path(run_dir)
    runs = find_runs(root)
    results = read_json(root / "results.json")
    if results is None and is_run(root):
        results = read_json(root.parent / "results.json")
    bench = find_bench(root)
    speeds = bench_speeds(bench)
    by_name = (results or {}).get("runs", {})
    for run in runs:
        r = by_name.get(run["name"]) or by_name.get(run["name"].split("/")[-1]) or {}
        run["heldout"] = r.get("heldout") or run["summary"].get("validation")
        run["second"] = r.get("milton") or r.get("second")
        run["parameters"] = run["parameters"] or r.get("parameters")
        run["size_bytes"] = run["size_bytes"] or r.get("size_bytes")
        run["train_tok_s"] = r.get("train_tok_s") or run["train_tok_s"]
        run["runtime_tok_s"] = dict(speeds.get(str((Path(run["dir"]) / "student").resolve()), {}))
        for s in sample_list(results):
            if s.get("student_run", "kd") == run["name"] and s.get("student_decode_tok_s"):
                run["runtime_tok_s"].setdefault(SAMPLE_RUNTIME, s["student_decode_tok_s"])
    return {"root": str(root), "runs": runs, "results": results, "bench": bench, "speeds": speeds}

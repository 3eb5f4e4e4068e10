"""``bench_models``: size, load time, prefill/decode speed and peak memory of models in one runtime.

Each (model, repeat) runs in a fresh Python process (``distillery.bench.worker``) so that peak RSS
and load time are honest: nothing is shared or already cached in memory. Models are interleaved
repeat by repeat (A, B, A, B, ...) so slow drift on a shared machine hits all of them alike. The
result keeps every run and, per metric, the median and the spread (min, max).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DistilleryError

RUNTIMES = ("torch", "llamacpp", "onnx", "mlx", "executorch")
METRICS = ("file_bytes", "load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "base_rss_bytes")


def check_model_path(path: str, runtime: str) -> str:
    """Check that ``path`` is something ``runtime`` loads; return it as a string."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DistilleryError(f"model '{path}' does not exist")
    if runtime == "torch" and not (p.is_dir() and (p / "config.json").is_file()):
        raise DistilleryError(f"'{path}' is not a HF model folder (config.json) for --runtime torch")
    if runtime == "llamacpp" and not (p.is_file() and p.suffix == ".gguf"):
        raise DistilleryError(f"'{path}' is not a .gguf file for --runtime llamacpp")
    if runtime == "onnx" and not ((p / "model.onnx").is_file() if p.is_dir() else p.suffix == ".onnx"):
        raise DistilleryError(f"'{path}' is neither an ONNX export folder nor a .onnx file for --runtime onnx")
    if runtime in ("mlx", "executorch") and not (p / f"distillery_{runtime}.json").is_file():
        raise DistilleryError(f"'{path}' is not a folder written by `distillery export --format {runtime}`")
    if runtime == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise DistilleryError("--runtime llamacpp needs llama-cpp-python: pip install 'distillery[llamacpp]'") from None
    return str(p)


def machine_info() -> dict:
    """CPU model, cores, library versions, date: what a benchmark result must state."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("llama-cpp-python", "onnxruntime", "transformers", "gguf", "mlx", "executorch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def run_once(spec: dict, timeout: float = 1800) -> dict:
    """Run one worker process and return its JSON result (DistilleryError if it fails)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "distillery.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistilleryError(f"benchmark of {spec['path']} ({spec['runtime']}) failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Per metric: median, min, max over runs."""
    out = {}
    for key in METRICS:
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def labels(paths: list[str]) -> list[str]:
    """A short name per model: its file or folder name, with as many parent folders as it takes to tell
    models apart (``runs/kd/student`` and ``runs/ce/student`` -> ``kd/student``, ``ce/student``)."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash or all(depth[i] >= len(parts[i]) for i, n in enumerate(names) if n in clash):
            return names
        depth = [d + (names[i] in clash and d < len(parts[i])) for i, d in enumerate(depth)]


def bench_models(paths: list[str], runtime: str = "torch", prompt_tokens: int = 512, new_tokens: int = 128,
                 repeats: int = 3, threads: int | None = None, text: str | None = None,
                 json_out: str | None = None, show: bool = True) -> dict:
    """Benchmark each model in ``paths`` in ``runtime``; return a JSON-able dict (and print a table).

    ``threads`` defaults to all cores. ``json_out`` also writes the result to that file.
    """
    if runtime not in RUNTIMES:
        raise DistilleryError(f"--runtime {runtime} is not supported (choose from {', '.join(RUNTIMES)})")
    if not paths:
        raise DistilleryError("no model to benchmark")
    if repeats < 1 or prompt_tokens < 8 or new_tokens < 1:
        raise DistilleryError("need repeats >= 1, prompt_tokens >= 8, new_tokens >= 1")
    paths = [check_model_path(p, runtime) for p in paths]
    threads = threads or os.cpu_count() or 1
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    names = dict(zip(paths, labels(paths)))
    total, done = repeats * len(paths), 0
    for r in range(repeats):
        for p in paths:
            spec = {"runtime": runtime, "path": p, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                    "threads": threads, "text": text}
            if show:  # each run loads a model in a fresh process: say what is running (stderr, tables stay clean)
                print(f"bench [{done + 1}/{total}] {names[p]} (run {r + 1}/{repeats}) ...", file=sys.stderr, flush=True)
            runs[p].append(run_once(spec))
            done += 1
            if show and "decode_tok_s" in runs[p][-1]:
                print(f"  decode {runs[p][-1]['decode_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
    result = {"runtime": runtime, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
              "threads": threads, "machine": machine_info(),
              "models": [{"path": p, "label": names[p], "summary": summarize(r), "runs": r} for p, r in runs.items()]}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    if show:
        print_table(result)
    return result


def print_table(result: dict) -> None:
    """A rich table: one row per model, median (min–max) per metric."""
    from rich.table import Table

    from ..quiet import console as wide_console

    table = Table(title=f"{result['runtime']}: prompt {result['prompt_tokens']}, decode {result['new_tokens']}, "
                        f"{result['repeats']} runs, {result['threads']} threads (median ±half-range)")
    for col in ("model", "size MB", "load s", "prefill tok/s", "decode tok/s", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def cell(s: dict, key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        """median ±half-range in % of the median."""
        if key not in s:
            return "-"
        m = s[key]
        spread = (m["max"] - m["min"]) / 2 / m["median"] * 100 if m["median"] else 0.0
        return f"{fmt.format(m['median'] / scale)} ±{spread:.0f}%"

    for model in result["models"]:
        s = model["summary"]
        table.add_row(model.get("label") or Path(model["path"]).name, f"{s['file_bytes']['median'] / 1e6:.1f}", cell(s, "load_s", fmt="{:.2f}"),
                      cell(s, "prefill_tok_s", fmt="{:.0f}"), cell(s, "decode_tok_s", fmt="{:.0f}"),
                      cell(s, "peak_rss_bytes", 1e6, "{:.0f}"))
    wide_console().print(table)  # piped: not cut at 80 columns

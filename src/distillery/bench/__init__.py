"""Runtime benchmark: file size, load time, prefill and decode tok/s, peak RSS, in torch, llama.cpp or ONNX Runtime.

Public API (imported lazily so that ``distillery --help`` stays fast):

* :func:`bench_models` — ``distillery bench``; see ``bench.runner``.
* :func:`add_bench_parser` — registers the ``bench`` verb on an argparse subparsers object.
"""

from __future__ import annotations

import importlib

_LAZY = {"bench_models": "runner", "machine_info": "runner", "print_table": "runner", "summarize": "runner"}

__all__ = [*_LAZY, "add_bench_parser"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def _run_bench(args) -> int:
    from .runner import bench_models

    bench_models(args.models, runtime=args.runtime, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                 repeats=args.repeats, threads=args.threads, json_out=args.json)
    return 0


def add_bench_parser(subparsers) -> None:
    """Register ``distillery bench MODEL... [--runtime torch|llamacpp|onnx|mlx|executorch] [--repeats N] [--json FILE]``."""
    p = subparsers.add_parser("bench", help="size, load time, prefill/decode tok/s and peak RSS of models in a runtime")
    p.add_argument("models", nargs="+", help="HF folders (torch), .gguf files (llamacpp) or export folders (onnx, mlx, "
                                             "executorch)")
    p.add_argument("--runtime", choices=("torch", "llamacpp", "onnx", "mlx", "executorch"), default="torch")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per model (median and spread)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=_run_bench)

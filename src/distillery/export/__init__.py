"""Export a student to device formats — GGUF (llama.cpp) and ONNX (ONNX Runtime) — with a round-trip check.

Public API (imported lazily so that ``distillery --help`` stays fast):

* :func:`export_model` — ``distillery export``; see ``export.api``.
* :func:`write_gguf`, :func:`write_onnx` — the writers without loading or verification.
* :func:`add_export_parser` — registers the ``export`` verb on an argparse subparsers object.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

_LAZY = {"export_model": "api", "write_gguf": "gguf_export", "write_onnx": "onnx_export",
         "load_student": "inputs", "heldout_text": "inputs"}

__all__ = [*_LAZY, "add_export_parser"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def _run_export(args) -> int:
    from ..errors import DistilleryError
    from .api import export_model

    text = None
    if args.verify_text:
        path = Path(args.verify_text)
        if not path.is_file():
            raise DistilleryError(f"--verify-text file '{path}' does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
    quant = args.quant or ("f16" if args.format == "gguf" else "f32")
    report = export_model(args.student, args.format, args.out, quant=quant, verify=args.verify,
                          verify_text=text, verify_tokens=args.verify_tokens)
    print(json.dumps(report, indent=2))
    return 0


def add_export_parser(subparsers) -> None:
    """Register ``distillery export STUDENT OUT --format gguf|onnx [--quant Q] [--no-verify]``."""
    p = subparsers.add_parser("export", help="export a student to GGUF (llama.cpp) or ONNX, verified in the runtime")
    p.add_argument("student", help="student folder (HF format, Llama or Qwen2, with its tokenizer)")
    p.add_argument("out", help="output: a .gguf file, or a folder for ONNX")
    p.add_argument("--format", choices=("gguf", "onnx"), default="gguf")
    p.add_argument("--quant", choices=("f32", "f16", "q8_0", "q4_0"), default=None,
                   help="GGUF weight type (default f16); ONNX graphs are f32")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="load the export in its runtime and compare logits with PyTorch (default: on)")
    p.add_argument("--verify-text", default=None, help="text file for the check (default: tail of Paradise Lost)")
    p.add_argument("--verify-tokens", type=int, default=512, help="held-out tokens compared (default 512)")
    p.set_defaults(func=_run_export)

"""Export a student to device formats — GGUF (llama.cpp), ONNX (ONNX Runtime), MLX, ExecuTorch, Core ML — with a round-trip check.

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

_LAZY = {"export_model": "api", "write_gguf": "gguf_export", "write_onnx": "onnx_export", "write_mlx": "mlx_export",
         "write_executorch": "executorch_export", "write_coreml": "coreml_export",
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
    quant = args.quant or {"gguf": "f16", "onnx": "f32"}.get(args.format)   # the Apple formats pick their own
    report = export_model(args.student, args.format, args.out, quant=quant, verify=args.verify,
                          verify_text=text, verify_tokens=args.verify_tokens, group_size=args.group_size,
                          max_seq_len=args.max_seq_len, embedding_bits=args.embedding_bits)
    print(json.dumps(report, indent=2))
    return 0


def add_export_parser(subparsers) -> None:
    """Register ``distillery export STUDENT OUT --format gguf|onnx|mlx|executorch|coreml [--quant Q] [--no-verify]``."""
    p = subparsers.add_parser("export", help="export a student to GGUF, ONNX, MLX, ExecuTorch or Core ML, verified")
    p.add_argument("student", help="student folder (HF format, a student family: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3; with its tokenizer)")
    p.add_argument("out", help="output: a .gguf file, or a folder for the other formats")
    p.add_argument("--format", choices=("gguf", "onnx", "mlx", "executorch", "coreml"), default="gguf")
    p.add_argument("--quant", choices=("f32", "f16", "q8_0", "q4_0", "q2", "q3", "q4", "q6", "q8", "8da4w", "p4"),
                   default=None, help="gguf: f32|f16|q8_0|q4_0 (default f16); onnx: f32; mlx: f32|f16|q2|q3|q4|q6|q8 "
                                      "(default f32); executorch: f32|8da4w (default f32); coreml: f16|q8|q4|p4 (default f16)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size for mlx (default 64), executorch and coreml (default 32)")
    p.add_argument("--embedding-bits", type=int, default=None, metavar="N",
                   help="mlx q2-q8: bits of the embedding and LM head (2, 3, 4, 6, 8; default: the --quant bits, or "
                        "what a `distillery quantize` folder records)")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="executorch/coreml: KV-cache length compiled into the program (default 1024)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="load the export in its runtime and compare logits with PyTorch (default: on)")
    p.add_argument("--verify-text", default=None, help="text file for the check (default: tail of Paradise Lost)")
    p.add_argument("--verify-tokens", type=int, default=512, help="held-out tokens compared (default 512)")
    p.set_defaults(func=_run_export)

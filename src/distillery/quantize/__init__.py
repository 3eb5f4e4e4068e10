"""Weight-only 2-8-bit quantization of a student and quantization-aware training helpers.

Public API (imported lazily so that ``distillery --help`` stays fast):

* :func:`quantize_model` / :func:`load_quantized` — ``distillery quantize``; see ``quantize.model``.
* :func:`qat_wrap` / :func:`qat_unwrap` — fake-quantized linear layers with STE gradients for the
  last steps of distillation; see ``quantize.qat``.
* :func:`fake_quantize`, :func:`quantize_weight`, :func:`dequantize_weight`, :func:`affine_quantize`,
  :func:`affine_dequantize` — the grids (GGUF Q8_0/Q4_0, MLX affine 2/3/4/6/8-bit); see ``quantize.core``.
* :func:`add_quantize_parser` — registers the ``quantize`` verb on an argparse subparsers object.
"""

from __future__ import annotations

import importlib
import json

_LAZY = {
    "quantize_model": "model", "load_quantized": "model", "quantize_linears": "model",
    "qat_wrap": "qat", "qat_unwrap": "qat",
    "fake_quantize": "core", "fake_quantize_ste": "core", "quantize_weight": "core", "dequantize_weight": "core",
    "affine_quantize": "core", "affine_dequantize": "core",
}

__all__ = [*_LAZY, "add_quantize_parser"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def _group_size(text: str) -> int | None:
    """argparse type: an int, or 'channel' for per-channel scales."""
    return None if text in ("channel", "none", "0") else int(text)


def _run_quantize(args) -> int:
    from .model import quantize_model

    report = quantize_model(args.student, bits=args.bits, group_size=args.group_size, out_dir=args.out,
                            include_lm_head=args.include_lm_head, eval_tokens=args.eval_tokens,
                            teacher_dir=args.teacher, scheme=args.scheme, clip=args.clip,
                            embeddings=False if args.keep_embeddings else None, embedding_bits=args.embedding_bits)
    print(json.dumps(report, indent=2))
    return 0


def add_quantize_parser(subparsers) -> None:
    """Register ``distillery quantize STUDENT --bits 8|6|4|3|2 [--embedding-bits N] [--scheme S] [--group-size N] [--out DIR]``."""
    p = subparsers.add_parser("quantize", help="weight-only 2-8-bit quantization of a student folder")
    p.add_argument("student", help="student folder (HF format, with its tokenizer)")
    p.add_argument("--bits", type=int, choices=(8, 6, 4, 3, 2), default=8)
    p.add_argument("--scheme", choices=("auto", "symmetric", "affine"), default="auto",
                   help="symmetric: GGUF Q8_0/Q4_0 grid (8, 4 bits); affine: MLX mx.quantize grid, scale and "
                        "bias per group (2, 3, 4, 6, 8 bits); auto: symmetric for 8/4, affine below")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="affine: leave the embedding and LM head unquantized (by default they are quantized, "
                        "as mlx_lm.convert -q does)")
    p.add_argument("--embedding-bits", type=int, default=None, metavar="N",
                   help="affine: bits of the embedding and LM head (2, 3, 4, 6, 8; default: --bits), e.g. "
                        "--bits 2 --embedding-bits 4 as llama.cpp's Q2_K keeps its output tensor wider")
    p.add_argument("--clip", choices=("none", "mse"), default="none",
                   help="affine only: search each group's range (clamp to r x [min, max], r in 1..0.5) for the "
                        "least squared error before rounding (none: MLX's plain min/max grid)")
    p.add_argument("--group-size", type=_group_size, default=-1,
                   help="scales per group of N input columns, or 'channel' (symmetric only; default: channel "
                        "for symmetric 8, else 32; affine takes 32, 64 or 128)")
    p.add_argument("--out", default=None, help="output folder (default: STUDENT-int<bits>)")
    p.add_argument("--include-lm-head", action="store_true", help="quantize the LM head too (untied heads only)")
    p.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens for the report (0: skip)")
    p.add_argument("--teacher", default=None, help="teacher folder, .gguf file or smollm2: also report KL(teacher || student)")
    p.set_defaults(func=_run_quantize)

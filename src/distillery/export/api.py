"""``export_model``: student folder → GGUF file or ONNX folder, verified in its runtime by default."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import DistilleryError
from ..locks import refuse_foreign, refuse_overwrite
from .folders import reject as _reject
from .inputs import SUPPORTED_ARCHS, check_student_dir, heldout_ids, load_student, student_arch

FORMATS = ("gguf", "onnx", "mlx", "executorch", "coreml")
APPLE_FORMATS = ("mlx", "executorch", "coreml")   # folder outputs, in ``apple_export``


def export_model(student_dir: str | Path, fmt: str, out: str | Path, quant: str = "f16", verify: bool = True,
                 verify_text: str | None = None, verify_tokens: int = 512, group_size: int | None = None,
                 max_seq_len: int = 1024, embedding_bits: int | None = None) -> dict:
    """Export a student (any of ``inputs.SUPPORTED_ARCHS``) to ``fmt`` ('gguf': file ``out``; 'onnx': folder ``out``); return a report.

    ``quant``: f32|f16|q8_0|q4_0 for GGUF; ONNX graphs are fp32 (pass 'f32' or leave the default).
    With ``verify`` (default) the exported model is loaded in llama.cpp (llama-cpp-python) or ONNX
    Runtime and compared with PyTorch on ``verify_tokens`` held-out tokens (``verify_text``, default:
    the tail of *Paradise Lost*); a failed check moves the output to ``<out>.rejected`` and raises
    :class:`DistilleryError`. See ``export.verify`` for the thresholds.
    'mlx', 'executorch' and 'coreml' (folders; ``group_size``, ``max_seq_len``) go through
    ``export.apple_export``; ``embedding_bits`` (mlx only): the embedding/LM head's width beside ``q<b>`` layers.
    """
    if fmt not in FORMATS:
        raise DistilleryError(f"--format {fmt} is not supported (choose {', '.join(FORMATS)})")
    if fmt in APPLE_FORMATS:
        from .apple_export import export_apple

        return export_apple(student_dir, fmt, out, quant, verify, verify_text, verify_tokens, group_size, max_seq_len,
                            embedding_bits)
    if embedding_bits is not None:
        raise DistilleryError(f"--embedding-bits is for --format mlx, not {fmt}")
    src = check_student_dir(student_dir)
    arch = SUPPORTED_ARCHS[student_arch(src)]
    out = Path(out).expanduser()
    refuse_overwrite(out, {"the student folder": src}, "export")  # e.g. OUT = STUDENT/model.safetensors
    if fmt == "onnx" and quant not in ("f32", "f16"):
        raise DistilleryError(f"--quant {quant} is not available for ONNX (the graph is fp32; quantize with ONNX Runtime tools)")
    if fmt == "gguf" and out.is_dir():
        raise DistilleryError(f"GGUF output '{out}' is a folder; give a file name such as student.gguf")
    if fmt == "gguf" and out.is_file() and not _starts_with(out, b"GGUF"):  # a typo naming a file of the user's
        raise DistilleryError(f"GGUF output '{out}' exists and is not a GGUF file; give a new file name such as "
                              "student.gguf")
    if fmt == "onnx":  # another model's folder would get its config and tokenizer replaced, then moved if rejected
        from .onnx_export import MANIFEST

        refuse_foreign(out, (MANIFEST,), "ONNX output", "an ONNX export's")
    model, tokenizer = load_student(src)
    t0 = time.perf_counter()
    if fmt == "gguf":
        from .gguf_export import write_gguf

        report = write_gguf(model, tokenizer, out, quant=quant, arch=arch, name=src.name)
    else:
        from .onnx_export import write_onnx

        report = write_onnx(model, tokenizer, out)
    report.update(student=str(src), export_seconds=round(time.perf_counter() - t0, 2))
    if not verify:
        report["verification"] = None
        return report
    ids = heldout_ids(tokenizer, verify_tokens, verify_text)
    window = min(len(ids), model.config.max_position_embeddings, 512)
    try:
        if fmt == "gguf":
            from .verify import verify_gguf

            result = verify_gguf(report["path"], model, tokenizer, quant, ids, window)
        else:
            from .verify import verify_onnx

            result = verify_onnx(report["path"], model, ids, window)
    except DistilleryError as exc:
        raise DistilleryError(f"wrote {report['path']} but did not verify it: {exc}") from None
    report["verification"] = result
    if not result["passed"]:
        moved = _reject(out)
        raise DistilleryError(f"{fmt} export failed verification ({'; '.join(result['problems'])}); output moved to {moved}")
    return report


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(magic)) == magic

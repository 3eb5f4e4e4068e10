"""``export_model`` for the Apple / phone formats: MLX (Macs), ExecuTorch (iOS, Android), Core ML (Apple).

Each writes a folder, checked by ``folders.check_out_dir`` (never inside or around the student,
never over a foreign folder), then verified in its runtime (MLX, ExecuTorch) or, for Core ML on a
machine without ``predict()``, by the PyTorch side of the traced module and the saved spec's
structure. A failed check moves the folder to ``<out>.rejected`` and raises one line.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import DistilleryError
from .folders import check_out_dir, reject
from .inputs import SUPPORTED_ARCHS, check_student_dir, heldout_ids, load_student, student_arch

# format -> (module, quant choices, default group size, the function that imports the runtime or says how to install it)
SPECS = {"mlx": ("mlx_export", ("f32", "f16", "q2", "q3", "q4", "q6", "q8"), 64, "_import_mlx"),
         "executorch": ("executorch_export", ("f32", "8da4w"), 32, "_import_executorch"),
         "coreml": ("coreml_export", ("f16", "q8", "q4", "p4"), 32, "_import_ct")}
DEFAULT_QUANT = {"mlx": "f32", "executorch": "f32", "coreml": "f16"}
# Families each format is verified on (mlx_lm has all the student families; the ExecuTorch and Core ML paths
# are tested on Llama and Qwen2 only): another family is refused in one line before anything loads.
FAMILIES = {"mlx": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
            "executorch": ("llama", "qwen2"), "coreml": ("llama", "qwen2")}


def export_apple(student_dir, fmt: str, out, quant: str | None, verify: bool, verify_text: str | None,
                 verify_tokens: int, group_size: int | None, max_seq_len: int, embedding_bits: int | None = None) -> dict:
    """Export ``student_dir`` to the ``fmt`` folder ``out``; see the module docstring. ``embedding_bits``: MLX only."""
    import importlib

    module_name, quants, default_group, require = SPECS[fmt]
    quant = quant or DEFAULT_QUANT[fmt]
    if quant not in quants:
        raise DistilleryError(f"--quant {quant} is not available for {fmt} (choose {', '.join(quants)})")
    group_size = group_size or default_group
    if embedding_bits is not None and fmt != "mlx":
        raise DistilleryError(f"--embedding-bits is for --format mlx, not {fmt}")
    if group_size < 2 or group_size & (group_size - 1):
        raise DistilleryError(f"--group-size {group_size} must be a power of two >= 2")
    if max_seq_len < 16:
        raise DistilleryError(f"--max-seq-len {max_seq_len} is too small (>= 16)")
    src = check_student_dir(student_dir)
    family = SUPPORTED_ARCHS[student_arch(src)]       # unsupported architectures fail before any loading
    if family not in FAMILIES[fmt]:
        raise DistilleryError(f"the {fmt} exporter does not write model_type '{family}' "
                              f"(it writes {', '.join(FAMILIES[fmt])}); try --format gguf or onnx")
    mod = importlib.import_module(f".{module_name}", __package__)
    out = check_out_dir(src, Path(out), mod.MANIFEST, fmt)
    getattr(mod, require)()                           # a missing runtime fails before the student is loaded
    model, tokenizer = load_student(src)
    t0 = time.perf_counter()
    if fmt == "mlx":
        report = mod.write_mlx(src, out, quant, group_size, embedding_bits)
    elif fmt == "executorch":
        report = mod.write_executorch(model, tokenizer, out, quant, group_size, max_seq_len)
    else:
        report = mod.write_coreml(model, tokenizer, out, quant, group_size, max_seq_len)
    report.update(student=str(src), export_seconds=round(time.perf_counter() - t0, 2))
    if not verify:
        report["verification"] = None
        return report
    ids = heldout_ids(tokenizer, verify_tokens, verify_text)
    window = min(len(ids), model.config.max_position_embeddings, max_seq_len, 512)
    if fmt == "mlx":
        result = mod.verify_mlx(out, model, ids, window, quant)
    elif fmt == "executorch":
        result = mod.verify_executorch(out, model, ids, window, quant, group_size)
    else:
        result = mod.verify_coreml(out, model, ids, window, quant)
    report["verification"] = result
    if not result["passed"]:
        moved = reject(out)
        raise DistilleryError(f"{fmt} export failed verification ({'; '.join(result['problems'])}); output moved to {moved}")
    return report

"""MLX export (Apple silicon Macs, mlx-lm) through ``mlx_lm.convert``, verified with ``mlx_lm.load``.

``quant``: ``f32`` / ``f16`` keep plain weights; ``q2 q3 q4 q6 q8`` use MLX's affine group
quantization: per group of ``group_size`` consecutive input weights ``w ≈ scale · q + bias`` with
``q`` in ``[0, 2^bits - 1]``. Embedding and linear layers are quantized; a tied LM head reuses the
(quantized) embedding, so it is stored once. Stored dtypes: ``f32`` everything fp32, ``f16`` everything
fp16; ``q<b>``: codes packed in uint32, the per-group scale and bias **fp16** (as mlx-lm stores them for
a half-precision model), every other tensor (norms) fp32. The codes are those of ``mx.quantize`` on the
fp32 weights (the grid a QAT run trained on); only the scale and bias are rounded to fp16, which costs
``16·2/g`` bits per weight instead of ``32·2/g`` (q3 at ``g=32``: 4 bits per weight, not 5). MLX's
``quantized_matmul`` promotes fp16 scales to the fp32 activations, so a Mac computes in fp32 on the
stored fp16 values; the quantized embedding's rows come out in fp16 and the first RMSNorm returns fp32.

``embedding_bits`` (q-quants only; None: ``bits``, or the ``embedding_bits`` a ``distillery quantize`` folder
records in its ``quantization.json``) stores the input embedding and the LM head at another width than
the layers, through ``mlx_lm.convert``'s ``quant_predicate``: ``config.json``'s ``quantization`` entry then
names those modules with their own ``bits`` (mlx_lm's per-layer form, which ``mlx_lm.load`` reads). A
folder quantized with the embeddings kept fp32 exports them unquantized. ``bits_per_weight`` in the
report: every stored tensor's bytes (codes, scales, biases, norms) × 8 / the parameter count.

The folder ``out`` is what ``mlx_lm.load`` / ``mlx_lm.generate --model out`` reads: ``model.safetensors``,
``config.json`` (with a ``quantization`` entry) and the tokenizer files, plus ``distillery_mlx.json``.
MLX runs on Linux x86-64 too (``mlx[cpu]``), which is how the export is checked here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import DistilleryError
from .device_check import GREEDY_NEW, GREEDY_PROMPT, greedy_fields, torch_greedy, verdict
from .folders import folder_bytes, staged_folder
from .metrics import compare_logits

QUANTS = {"f32": None, "f16": None, "q2": 2, "q3": 3, "q4": 4, "q6": 6, "q8": 8}
MANIFEST = "distillery_mlx.json"
HINT = "MLX is not installed: pip install 'distillery[apple]' (mlx[cpu], mlx-lm[cpu] on Linux)"


def _import_mlx():
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError:
        raise DistilleryError(HINT) from None
    return mx, mlx_lm


def recorded_embedding_bits(student_dir: Path) -> tuple[bool, int | None]:
    """``(found, bits)``: the embedding width a ``distillery quantize`` folder of the affine scheme records
    (``bits`` None: its embeddings were kept fp32); ``(False, None)`` for any other folder."""
    path = Path(student_dir) / "quantization.json"
    if not path.is_file():
        return False, None
    rec = json.loads(path.read_text())
    if rec.get("scheme") != "affine" or "embeddings" not in rec:
        return False, None
    return True, (rec.get("embedding_bits", rec["bits"]) if rec["embeddings"] else None)


def _embedding_predicate(embedding_bits: int | None, group_size: int):
    """``quant_predicate(path, module)`` for ``mlx_lm.convert``: the input embedding (an ``nn.Embedding``)
    and an untied ``lm_head`` at ``embedding_bits`` (False: left unquantized when None); other modules True
    (the layers at ``q_bits``)."""
    import mlx.nn as mnn

    def predicate(path: str, module) -> bool | dict:
        if isinstance(module, mnn.Embedding) or path.rsplit(".", 1)[-1] == "lm_head":
            return False if embedding_bits is None else {"group_size": group_size, "bits": embedding_bits,
                                                         "mode": "affine"}
        return True
    return predicate


def write_mlx(student_dir: Path, out: Path, quant: str = "f32", group_size: int = 64,
              embedding_bits: int | None = None) -> dict:
    """Convert the student folder with ``mlx_lm.convert`` into ``out`` (replaced atomically); return a report.
    ``embedding_bits``: see the module docstring."""
    _import_mlx()
    from mlx_lm.convert import convert

    bits = QUANTS[quant]
    found, recorded = recorded_embedding_bits(student_dir)
    if embedding_bits is not None and not bits:
        raise DistilleryError(f"--embedding-bits {embedding_bits} needs a quantized --quant (q2 q3 q4 q6 q8), not {quant}")
    if embedding_bits is not None and embedding_bits not in (2, 3, 4, 6, 8):
        raise DistilleryError(f"--embedding-bits {embedding_bits} is not a width of MLX's affine grid (choose 2, 3, 4, 6 or 8)")
    keep_fp32 = embedding_bits is None and found and recorded is None
    embedding_bits = embedding_bits if embedding_bits is not None else (recorded if found else None)
    mixed = bits and (keep_fp32 or (embedding_bits is not None and embedding_bits != bits))
    predicate = _embedding_predicate(embedding_bits, group_size) if mixed else None
    with staged_folder(out) as tmp:
        target = tmp / "mlx"                         # convert() insists on a path that does not exist yet
        try:
            with contextlib.redirect_stdout(sys.stderr):   # its progress lines would spoil the CLI's JSON
                convert(str(student_dir), str(target), quantize=bits is not None, q_bits=bits,
                        q_group_size=group_size if bits else None, quant_predicate=predicate,
                        dtype="float16" if quant == "f16" else "float32")
        except ValueError as exc:
            raise DistilleryError(f"mlx_lm.convert failed for {student_dir}: {exc}".splitlines()[0]) from None
        for f in target.iterdir():
            f.rename(tmp / f.name)
        target.rmdir()
        _legacy_rope_keys(tmp / "config.json")
        if bits:
            _half_scales(tmp)
        manifest = {"format": "mlx", "quant": quant, "bits": bits, "group_size": group_size if bits else None,
                    "embedding_bits": (None if keep_fp32 else embedding_bits or bits) if bits else None,
                    "mode": "affine" if bits else None, "scales_dtype": "float16" if bits else None,
                    "source": str(student_dir)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"format": "mlx", "path": str(out), "quant": quant, "group_size": manifest["group_size"],
            "embedding_bits": manifest["embedding_bits"], "bytes": folder_bytes(out, "*.safetensors"),
            **storage_bits(out)}


def storage_bits(folder: Path) -> dict:
    """Parameters and bits per weight of an MLX folder, from its own files: a quantized tensor's parameter count
    is its ``scales``' size × its group size (per-module ``quantization`` entries of ``config.json`` first),
    any other tensor's its size; ``bits_per_weight`` = all stored tensor bytes × 8 / all parameters."""
    mx, _ = _import_mlx()
    quant = json.loads((Path(folder) / "config.json").read_text()).get("quantization") or {}
    params = nbytes = 0
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        arrays = mx.load(str(shard))
        nbytes += sum(v.nbytes for v in arrays.values())
        for k, v in arrays.items():
            base, leaf = k.rsplit(".", 1) if "." in k else ("", k)
            if leaf == "scales":
                own = quant.get(base)
                params += v.size * (own["group_size"] if isinstance(own, dict) else quant["group_size"])
            elif leaf == "biases" and base + ".scales" in arrays:
                continue
            elif not (leaf == "weight" and base + ".scales" in arrays):
                params += v.size
    return {"parameters": params, "stored_bytes": nbytes, "bits_per_weight": nbytes * 8 / max(params, 1)}


def _half_scales(folder: Path) -> None:
    """Rewrite ``folder``'s weight shards with every quantized tensor's ``.scales`` / ``.biases`` in fp16.

    Why not ``convert(dtype="float16")``: that casts the weights to fp16 *before* quantizing (other codes
    than the fp32 grid a QAT run learnt: 0.4 % of 3-bit codes move on Gaussian weights) and makes every
    activation fp16. A quantized tensor is one with a uint32 ``.weight`` beside its ``.scales``.
    """
    mx, _ = _import_mlx()
    total = 0
    for shard in sorted(folder.glob("model*.safetensors")):
        arrays = mx.load(str(shard))
        for k, v in arrays.items():
            base = k.rsplit(".", 1)[0]
            if k.endswith((".scales", ".biases")) and arrays.get(base + ".weight", v).dtype == mx.uint32:
                arrays[k] = v.astype(mx.float16)
        total += sum(v.nbytes for v in arrays.values())
        mx.save_safetensors(str(shard), arrays, metadata={"format": "mlx"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():                                # its byte count must describe the files
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=4))


def _legacy_rope_keys(config_path: Path) -> None:
    """Copy transformers-5 ``rope_parameters`` into the keys mlx-lm reads (``rope_theta``, ``rope_scaling``,
    Gemma 3's ``rope_local_base_freq``); keys already there are kept.

    Why: mlx-lm 0.32's model classes (llama, qwen2, gemma3, ...) read only the legacy keys and silently fall
    back to their defaults (``rope_theta=10000``) otherwise — a student pruned from SmolLM2 (theta 100,000)
    then ran with the wrong rotary frequencies (max |dlogit| 2.2, top-1 94.5 % against PyTorch).
    Flat ``rope_parameters`` (one dict) or per layer type (``{"full_attention": {...}, "sliding_attention": {...}}``).
    """
    cfg = json.loads(config_path.read_text())
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return
    full = params.get("full_attention", params)
    local = params.get("sliding_attention") if "full_attention" in params else None
    if isinstance(full, dict) and "rope_theta" in full:
        cfg.setdefault("rope_theta", full["rope_theta"])
        if full.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in full.items() if k != "rope_theta"})
    if isinstance(local, dict) and "rope_theta" in local:
        cfg.setdefault("rope_local_base_freq", local["rope_theta"])
    config_path.write_text(json.dumps(cfg, indent=2))


def _np(x) -> np.ndarray:
    mx, _ = _import_mlx()
    return np.array(x.astype(mx.float32))


def _to_f32(model) -> None:
    """Cast float parameters (not packed quantized codes) to fp32 so the MLX pass computes in fp32."""
    mx, _ = _import_mlx()
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))


def dequantized_torch(out: Path, model):
    """A copy of the torch ``model`` carrying the MLX file's weights, dequantized to fp32 (the parity reference).

    The stored fp16 scales and biases are cast to fp32 (exact) *before* ``s·q + b`` is formed, in fp32: the
    value MLX's fp32 ``quantized_matmul`` uses. Dequantizing in fp16 would round every weight once more."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    mlx_model, _ = load_model(Path(out))
    _to_f32(mlx_model)
    dequantize_model(mlx_model)
    weights = {k: torch.from_numpy(_np(v)) for k, v in tree_flatten(mlx_model.parameters())}
    ref = copy.deepcopy(model)
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise DistilleryError(f"MLX weights of {out} do not map onto the student: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return ref.eval()


def _mlx_greedy(mlx_model, prompt: list[int], n_new: int) -> list[int]:
    mx, _ = _import_mlx()
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(mlx_model)
    logits = mlx_model(mx.array([prompt]), cache=cache)
    tokens = []
    for _ in range(n_new):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        logits = mlx_model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens


def mlx_logits(mlx_model, ids: list[int], window: int) -> np.ndarray:
    """MLX logits ``(N, V)`` for ``ids``, window by window, each from an empty context."""
    mx, _ = _import_mlx()
    from .verify import _windows

    return np.concatenate([_np(mlx_model(mx.array([w]))[0]) for w in _windows(ids, window)])


def _cached_logits(mlx_model, w: list[int]) -> np.ndarray:
    """Logits ``(T, V)`` for one window: the first half in one call, then one token at a time with the cache."""
    mx, _ = _import_mlx()
    from mlx_lm.models.cache import make_prompt_cache

    cache, half = make_prompt_cache(mlx_model), len(w) // 2
    rows = [_np(mlx_model(mx.array([w[:half]]), cache=cache)[0])]
    rows += [_np(mlx_model(mx.array([[t]]), cache=cache)[0]) for t in w[half:]]
    return np.concatenate(rows)


def verify_mlx(out: Path, model, ids: list[int], window: int, quant: str) -> dict:
    """Parity (MLX in fp32 vs torch on the file's dequantized weights) and fidelity (vs the fp32 student)."""
    _import_mlx()
    from mlx_lm import load

    from .verify import torch_logits

    ref_model = dequantized_torch(out, model)
    ref = torch_logits(ref_model, ids, window)
    native, _ = load(str(out))                       # as a Mac user runs it (f16 computes in fp16)
    result = {"fidelity": compare_logits(torch_logits(model, ids, window), mlx_logits(native, ids, window))}
    fp32, _ = load(str(out))
    _to_f32(fp32)
    result.update(compare_logits(ref, mlx_logits(fp32, ids, window)))
    first = ids[:window]
    result["kv_cache_max_abs_diff"] = float(np.abs(_cached_logits(fp32, first) - ref[:len(first)]).max())
    prompt = ids[:GREEDY_PROMPT]
    result.update(greedy_fields(torch_greedy(ref_model, prompt, GREEDY_NEW), _mlx_greedy(fp32, prompt, GREEDY_NEW)))
    result["reference"] = "torch on the MLX weights dequantized to fp32; MLX computing in fp32"
    return verdict(result, quant)

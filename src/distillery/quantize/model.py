"""``quantize_model``: weight-only 2-8-bit quantization of a student folder, saved loadably.

What is written to ``out_dir``:

* ``model.safetensors`` + ``config.json`` + tokenizer: a plain HF model whose linear weights are the
  *dequantized* values (``q * d``, or ``s * q + b`` for the affine scheme). Every loader and converter
  takes it as is (``from_pretrained``, ``export_model`` — and GGUF Q8_0/Q4_0 export of an int8/int4-g32
  model, or MLX ``mx.quantize`` of an affine one with the same bits and group size, re-quantizes onto
  the same grid, so it loses nothing more).
* ``quantized.safetensors``: the compact form, ``<linear>.qweight`` and ``<linear>.scales`` (fp32,
  ``(O, I // g)``), plus ``<linear>.biases`` for the affine scheme, and every other tensor as is.
  Symmetric: int8 codes, or int4 codes packed two per byte as uint8. Affine: codes packed into uint32
  exactly as ``mx.quantize`` packs them (so ``qweight``/``scales``/``biases`` are MLX's own tensors).
  ``load_quantized(out_dir)`` rebuilds the model from this file alone (dequantizing on load).
* ``quantization.json``: the scheme and the report below.

The report compares the quantized student with its fp32 self on held-out text (default: the tail of
*Paradise Lost*): perplexity of both, KL(fp32 ‖ quantized), top-1 agreement and relative logit error;
with ``teacher_dir``, also KL(teacher ‖ student) before and after.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DistilleryError
from ..locks import refuse_foreign
from ..export.inputs import check_student_dir, heldout_ids, load_student
from ..export.metrics import compare_logits, mean_nll
from .qat import check_embedding_bits, embedding_names, quant_targets
from .core import (CLIPS, affine_clip, affine_dequantize, affine_quantize, check_group_size, default_group_size,
                   dequantize_weight, pack_bits, pack_int4, quantize_weight, resolve_scheme, unpack_bits,
                   unpack_int4)

SCHEME_FILE = "quantization.json"
PACKED_FILE = "quantized.safetensors"


def quantize_linears(model: nn.Module, bits: int, group_size: int | None,
                     include_lm_head: bool = False, scheme: str | None = None,
                     clip: str = "none", embeddings: bool | None = None,
                     embedding_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Quantize ``model``'s linear weights in place (weights become their dequantized grid values);
    return the packed tensors. ``scheme`` None: symmetric for 8/4 bits, affine below (see ``core``);
    ``clip="mse"``: affine grid of the range-searched clamp (``core.affine_clip``); ``embeddings``
    (None: True for affine, as ``mlx_lm.convert -q``): the input embedding and LM head too, a tied
    pair once, at ``embedding_bits`` (affine only; None: ``bits``)."""
    scheme = resolve_scheme(bits, scheme)
    if clip not in CLIPS or (clip != "none" and scheme != "affine"):
        raise DistilleryError(f"clip '{clip}': choose none, or mse with the affine scheme")
    embeddings = scheme == "affine" if embeddings is None else embeddings
    check_embedding_bits(embedding_bits, scheme, embeddings)
    high = embedding_names(model) if embedding_bits is not None else set()
    packed: dict[str, torch.Tensor] = {}
    seen = set()
    for name, lin in quant_targets(model, include_lm_head, embeddings).items():
        if id(lin.weight) in seen:  # the LM head tied to the embedding: stored once, under the embedding
            continue
        seen.add(id(lin.weight))
        if scheme == "affine":
            nb = embedding_bits if name in high else bits
            w = affine_clip(lin.weight, nb, group_size) if clip == "mse" else lin.weight
            q, s, b = affine_quantize(w, nb, group_size, name=name)
            with torch.no_grad():
                lin.weight.copy_(affine_dequantize(q, s, b, lin.weight.dtype))
            packed.update({f"{name}.qweight": pack_bits(q, nb), f"{name}.scales": s.contiguous(),
                           f"{name}.biases": b.contiguous()})
            continue
        q, d = quantize_weight(lin.weight, bits, group_size, name=name)
        with torch.no_grad():
            lin.weight.copy_(dequantize_weight(q, d, lin.weight.dtype))
        packed[f"{name}.qweight"] = pack_int4(q) if bits == 4 else q
        packed[f"{name}.scales"] = d.contiguous()
    return packed


@torch.no_grad()
def _heldout_logits(model, ids: list[int], window: int) -> torch.Tensor:
    """Logits ``(N, V)`` for ``ids`` run in independent windows of ``window`` tokens."""
    rows = [model(torch.tensor([ids[i:i + window]])).logits[0] for i in range(0, len(ids), window)]
    return torch.cat(rows)


def _window_ppl(logits: torch.Tensor, ids: list[int], window: int) -> float:
    """Perplexity over independent windows (each window's first token is not predicted)."""
    nll, n = 0.0, 0
    for i in range(0, len(ids), window):
        chunk = ids[i:i + window]
        if len(chunk) > 1:
            mean, count = mean_nll(logits[i:i + len(chunk)], chunk)
            nll, n = nll + mean * count, n + count
    return math.exp(nll / max(n, 1))


def quantize_model(student_dir: str | Path, bits: int = 8, group_size: int | None = -1,
                   out_dir: str | Path | None = None, include_lm_head: bool = False,
                   eval_tokens: int = 512, teacher_dir: str | Path | None = None,
                   scheme: str | None = None, clip: str = "none", embeddings: bool | None = None,
                   embedding_bits: int | None = None) -> dict:
    """Quantize a student folder's linear layers (weight-only) and save it; return a report.

    ``scheme`` None/'auto': symmetric (GGUF Q8_0/Q4_0) for 8 and 4 bits, affine (MLX) for 2, 3 and 6.
    ``group_size=-1``: the default (symmetric int8 per channel, else groups of 32); ``None``: per
    channel (symmetric only). ``out_dir`` defaults to ``<student_dir>-int<bits>``. Symmetric: the LM
    head (often tied to the embeddings) stays fp32 unless ``include_lm_head``. Affine: ``embeddings``
    (default True) quantizes the input embedding and LM head too, as ``mlx_lm.convert -q`` does, at
    ``embedding_bits`` (None: ``bits``; recorded in ``quantization.json`` as the effective width, null
    when they stay fp32, so ``export --format mlx`` of the folder stores them at that width). ``eval_tokens=0`` skips the evaluation.
    A student trained with ``qat`` at the same bits, group size and scheme quantizes to exactly the
    weights its training forward saw (with ``clip="none"`` here even after ``qat.clip="mse"``: the
    range search is already written into its weights). ``clip="mse"`` is a post-training range search.
    """
    try:
        scheme = resolve_scheme(bits, scheme)
    except DistilleryError as err:
        raise DistilleryError(f"--bits {bits}: {err}") from None
    src = check_student_dir(student_dir)
    group_size = default_group_size(bits, scheme) if group_size == -1 else group_size
    check_group_size(scheme, group_size, name="--group-size")
    out = Path(out_dir) if out_dir is not None else src.with_name(f"{src.name}-int{bits}")
    if out.resolve() == src.resolve():
        raise DistilleryError(f"output folder '{out}' is the student folder; choose another")
    # another model's folder (or the user's files) would get this one's config.json and weights written over its own
    refuse_foreign(out, (SCHEME_FILE,), "quantize --out", "a quantized student's")
    model, tok = load_student(src)
    embeddings = scheme == "affine" if embeddings is None else embeddings
    if include_lm_head and model.config.tie_word_embeddings and not embeddings:
        raise DistilleryError("include_lm_head with tied embeddings would quantize the input embeddings too")
    try:
        check_embedding_bits(embedding_bits, scheme, embeddings, "--embedding-bits")
    except DistilleryError as err:
        raise DistilleryError(f"{err} (--bits {bits})") from None
    reference = None
    if eval_tokens:
        ids = heldout_ids(tok, eval_tokens)
        window = min(256, model.config.max_position_embeddings)
        reference = _heldout_logits(model, ids, window)
    packed = quantize_linears(model, bits, group_size, include_lm_head, scheme=scheme, clip=clip, embeddings=embeddings,
                              embedding_bits=embedding_bits)
    report = {"student": str(src), "out_dir": str(out), "bits": bits, "group_size": group_size, "scheme": scheme,
              "clip": clip, "quantized_tensors": sum(k.endswith(".qweight") for k in packed),
              "quantized_linears": sum(k.endswith(".qweight") and isinstance(model.get_submodule(k[:-8]), nn.Linear)
                                       for k in packed),
              "include_lm_head": include_lm_head or embeddings, "embeddings": embeddings,
              "embedding_bits": (embedding_bits or bits) if embeddings else None}
    if reference is not None:
        quant = _heldout_logits(model, ids, window)
        cmp = compare_logits(reference, quant)
        report.update(eval_tokens=len(ids), perplexity_fp32=_window_ppl(reference, ids, window),
                      perplexity_quant=_window_ppl(quant, ids, window), kl_fp32_quant=cmp["kl_ref_test"],
                      top1_agreement=cmp["top1_agreement"], rel_logit_error=cmp["rel_error"])
        report["perplexity_change_pct"] = 100 * (report["perplexity_quant"] / report["perplexity_fp32"] - 1)
        if teacher_dir is not None:
            report.update(_teacher_kl(teacher_dir, ids, window, reference, quant))
    _save(model, tok, packed, out, report)
    report["bytes_packed"] = (out / PACKED_FILE).stat().st_size
    # a tied LM head shares the embedding's storage: count each tensor once (it was counted twice: 54% "saved" for 17%)
    report["bytes_fp32"] = sum(t.numel() * 4 for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    (out / SCHEME_FILE).write_text(json.dumps(report, indent=2))
    return report


def _teacher_kl(teacher_dir, ids, window, student_fp32, student_quant) -> dict:
    """``teacher_dir`` is any teacher source every other verb takes: a folder, a ``.gguf`` file, or ``smollm2``."""
    from ..teachers.hf import resolve_source

    folder = teacher_dir if Path(str(teacher_dir)).expanduser().is_dir() else resolve_source(str(teacher_dir))[0]
    teacher, _ = load_student(folder, need_tokenizer=False)
    t_logits = _heldout_logits(teacher, ids, window)
    if t_logits.shape[-1] != student_fp32.shape[-1]:
        raise DistilleryError(f"teacher vocab {t_logits.shape[-1]} != student vocab {student_fp32.shape[-1]}")
    before = compare_logits(t_logits, student_fp32)["kl_ref_test"]
    after = compare_logits(t_logits, student_quant)["kl_ref_test"]
    return {"kl_teacher_student_fp32": before, "kl_teacher_student_quant": after}


def _save(model, tok, packed: dict[str, torch.Tensor], out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out)
    quantized = {n for n in packed if n.endswith(".qweight")}
    skip = {n.removesuffix(".qweight") + ".weight" for n in quantized}
    rest = {k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}
    if model.config.tie_word_embeddings:
        rest.pop("lm_head.weight", None)  # shared with the embeddings: store once
    meta = {"bits": str(report["bits"]), "group_size": str(report["group_size"]), "scheme": report["scheme"],
            "embedding_bits": str(report.get("embedding_bits"))}
    save_file({**rest, **packed}, str(out / PACKED_FILE), metadata=meta)
    (out / SCHEME_FILE).write_text(json.dumps(report, indent=2))


def load_quantized(quant_dir: str | Path):
    """Rebuild the quantized student from ``quantized.safetensors`` alone, dequantizing into a plain
    fp32 HF model (eval mode). The result equals ``from_pretrained(quant_dir)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_student_dir(quant_dir)
    if not (path / PACKED_FILE).is_file():
        raise DistilleryError(f"{path} has no {PACKED_FILE}; is it the output of `distillery quantize`?")
    scheme = json.loads((path / SCHEME_FILE).read_text())
    tensors = load_file(str(path / PACKED_FILE))
    state = {}
    affine = scheme.get("scheme", "symmetric") == "affine"  # files written before the affine scheme: symmetric
    for key, value in tensors.items():
        if key.endswith((".scales", ".biases")):
            continue
        if key.endswith(".qweight"):
            base = key.removesuffix(".qweight")
            if affine:   # the embedding/head may hold other bits (embedding_bits): read the width off the shapes
                in_features = tensors[base + ".scales"].shape[-1] * scheme["group_size"]
                q = unpack_bits(value, value.shape[-1] * 32 // in_features)
                state[base + ".weight"] = affine_dequantize(q, tensors[base + ".scales"], tensors[base + ".biases"])
                continue
            q = unpack_int4(value) if scheme["bits"] == 4 else value
            state[base + ".weight"] = dequantize_weight(q, tensors[base + ".scales"])
        else:
            state[key] = value
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise DistilleryError(f"{path / PACKED_FILE}: missing {missing[:3]} unexpected {unexpected[:3]} tensors")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()

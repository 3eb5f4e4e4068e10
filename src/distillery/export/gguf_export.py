"""Write a HF causal LM (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3: ``gguf_families``) as a GGUF file llama.cpp runs on its own.

Uses the ``gguf`` package only: ``GGUFWriter`` for the file, ``get_tensor_name_map`` for HF → GGUF
tensor names and ``gguf.quants.quantize`` for F16/Q8_0/Q4_0 blocks (the same code paths as llama.cpp's
converter, without its tokenizer-fingerprint gate or its newer-``gguf`` requirement).

Conventions followed (as in llama.cpp's ``convert_hf_to_gguf.py``):

* Llama q/k projections are permuted from HF's rotate-half layout back to the interleaved-pair layout
  llama.cpp's (non-NeoX) RoPE expects; the NeoX-RoPE families need no permutation (per-family rules:
  ``gguf_families``).
* 1-D tensors (norms, biases) stay F32.
* ``q4_0``: linear layers and a separate token embedding are Q4_0; the tensor that computes the
  logits (``output.weight``, or ``token_embd.weight`` when tied) is Q8_0, the way llama.cpp's own
  quantizer keeps the output layer at higher precision. Rows whose length is not a multiple of 32
  fall back to F16.
* Tied embeddings: no ``output.weight`` is written; llama.cpp reuses ``token_embd.weight``.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import DistilleryError
from .gguf_families import add_family_hparams, check_config, context_length, family, fix_tensor, permute_qk, rope
from .gguf_vocab import add_tokenizer, tokenizer_metadata

QUANTS = ("f32", "f16", "q8_0", "q4_0")
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
Q = gguf.GGMLQuantizationType


def _add_hparams(w: gguf.GGUFWriter, cfg, quant: str, name: str) -> None:
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[quant])
    if quant in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    fam = family(cfg)
    w.add_context_length(context_length(cfg, fam))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.num_key_value_heads or n_head)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    theta, scaling = rope(cfg)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    add_family_hparams(w, cfg, fam)


def _qtype(gguf_name: str, data: np.ndarray, quant: str, logits_tensor: str) -> gguf.GGMLQuantizationType:
    """Storage type of one tensor: see the module docstring."""
    if data.ndim <= 1 or quant == "f32":
        return Q.F32
    if quant == "f16" or data.shape[-1] % 32:
        return Q.F16
    if quant == "q8_0" or gguf_name == logits_tensor:
        return Q.Q8_0
    return Q.Q4_0


def gguf_tensors(model, arch: str | None = None):
    """Yield ``(gguf_name, fp32 numpy array)`` for every tensor llama.cpp needs, in HF order
    (``arch``: unused, the family comes from ``model.config.model_type``)."""
    cfg = model.config
    fam = family(cfg)
    tmap = gguf.get_tensor_name_map(fam.arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DistilleryError(f"tensor {hf_name} has no GGUF name for {cfg.model_type}")
        t = fix_tensor(hf_name, tensor.detach().float(), cfg, fam)
        yield name, t.contiguous().numpy()


def write_gguf(model, tokenizer, out: str | Path, quant: str = "f16", arch: str = "llama",
               name: str = "distillery-student") -> dict:
    """Write ``model`` (+ ``tokenizer``, chat template) to ``out`` as GGUF; return what was written.

    The file is written under a temporary name and renamed at the end, so a crash never leaves a
    half-written ``.gguf`` behind.
    """
    if quant not in QUANTS:
        raise DistilleryError(f"--quant {quant} is not supported (choose from {', '.join(QUANTS)})")
    cfg = model.config
    fam = family(cfg)  # ``arch`` is what the report shows; the family comes from the config
    check_config(cfg, fam)
    vocab = tokenizer_metadata(tokenizer, cfg.vocab_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[fam.arch])
    _add_hparams(writer, cfg, quant, name)
    add_tokenizer(writer, vocab)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    logits_tensor = "token_embd.weight" if tied else "output.weight"
    types: collections.Counter = collections.Counter()
    for gname, data in gguf_tensors(model, arch):
        qtype = _qtype(gname, data, quant, logits_tensor)
        writer.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        types[qtype.name] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return {"format": "gguf", "path": str(out), "quant": quant, "arch": cfg.model_type, "bytes": out.stat().st_size,
            "tensor_types": dict(types), "tokenizer_pre": vocab["pre"], "tokenizer_pre_exact": vocab["pre_exact"],
            "vocab_size": cfg.vocab_size, "chat_template": vocab["chat_template"] is not None}

"""What each student family needs to become a GGUF file llama.cpp runs: arch, hparams, tensor fixes.

One :class:`Family` row per Hugging Face ``model_type`` the GGUF exporter writes. The conventions are
those of llama.cpp's ``convert_hf_to_gguf.py`` (checked against llama.cpp 0.3.36 by
``tests/test_export_families.py``):

* ``permute_qk``: Llama-style q/k rows go from HF's rotate-half layout to llama.cpp's interleaved
  pairs (Llama, Mistral: llama.cpp's ``llama`` arch uses non-NeoX RoPE). Qwen, Gemma, Phi-3 use NeoX
  RoPE and are written as they are.
* ``norm_plus_one``: Gemma's RMSNorm computes ``x̂ · (1 + w)``; llama.cpp's computes ``x̂ · w``, so
  every ``*norm.weight`` is written as ``1 + w`` (Gemma 3's q/k norms too).
* Gemma scales the token embedding by ``√d`` inside the model in both runtimes (nothing to write), and
  always reads the logits off the tied token embedding: an untied Gemma is refused.
* Gemma 2/3 scale attention scores by ``query_pre_attn_scalar^-½``; llama.cpp uses ``head_dim^-½``
  (except for its 27B size class), so a student whose ``query_pre_attn_scalar`` is not its ``head_dim``
  is refused (students built by distillery get ``query_pre_attn_scalar = head_dim``).
* Sliding-window attention: Mistral is written as ``llama`` (no sliding window), so its context length
  is capped at the window, where sliding and full attention agree; Gemma 2/3 and Phi-3 carry the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from ..errors import DistilleryError

A = gguf.MODEL_ARCH
NO_SOFTCAP = 1e6  # |z| <= 1e3 -> c·tanh(z/c) = z (1 - (z/c)²/3): off by <= 3e-7 relative


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_plus_one: bool = False
    tied_only: bool = False         # llama.cpp reads the logits off token_embd
    softcaps: bool = False          # attn/final logit soft-capping keys (Gemma 2)
    sliding: str = "none"           # 'cap': context capped at the window; 'key': window written; 'none'


FAMILIES = {
    "llama": Family(A.LLAMA, permute_qk=True),
    "mistral": Family(A.LLAMA, permute_qk=True, sliding="cap"),
    "qwen2": Family(A.QWEN2),
    "qwen3": Family(A.QWEN3),
    "gemma": Family(A.GEMMA, norm_plus_one=True, tied_only=True),
    "gemma2": Family(A.GEMMA2, norm_plus_one=True, tied_only=True, softcaps=True, sliding="key"),
    "gemma3_text": Family(A.GEMMA3, norm_plus_one=True, sliding="key"),
    "phi3": Family(A.PHI3, sliding="key"),
}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k weight ``(n_head * hd, in)`` (or bias ``(n_head * hd,)``) of each head
    from ``[x_0 .. x_{hd/2-1}, y_0 .. y_{hd/2-1}]`` (HF rotate-half) to ``[x_0, y_0, x_1, y_1, ...]``."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def family(cfg) -> Family:
    """The row for ``cfg.model_type``, or one line saying the GGUF exporter does not write it."""
    fam = FAMILIES.get(getattr(cfg, "model_type", None))
    if fam is None:
        raise DistilleryError(f"the GGUF exporter does not write model_type '{getattr(cfg, 'model_type', None)}' "
                              f"(it writes {', '.join(FAMILIES)}); try --format onnx")
    return fam


def rope(cfg) -> tuple[float, dict]:
    """(θ, scaling dict) of the full-attention layers (Gemma 3 keeps one dict per layer type)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return float(theta), (getattr(cfg, "rope_scaling", None) or params)


def check_config(cfg, fam: Family) -> None:
    """Refuse config features the GGUF arch we write cannot express (one line each)."""
    mt = cfg.model_type
    _, scaling = rope(cfg)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise DistilleryError(f"RoPE scaling '{rope_type}' is not supported by the GGUF exporter (default or linear only)")
    if getattr(cfg, "mlp_bias", False):
        raise DistilleryError(f"{mt} models with mlp_bias=True are not supported by the GGUF exporter")
    if mt == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise DistilleryError("Qwen2 models with use_sliding_window=True are not supported by the GGUF exporter")
    if fam.tied_only and not getattr(cfg, "tie_word_embeddings", True):
        raise DistilleryError(f"{mt} with tie_word_embeddings=False is not supported by the GGUF exporter "
                              "(llama.cpp reads the logits off the token embedding)")
    if fam.norm_plus_one and fam.arch != A.GEMMA:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        scalar = getattr(cfg, "query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            raise DistilleryError(f"{mt} with query_pre_attn_scalar={scalar} != head_dim={head_dim} is not supported "
                                  "by the GGUF exporter (llama.cpp scales attention by head_dim^-1/2)")
    if mt == "phi3" and float(scaling.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise DistilleryError("phi3 with partial_rotary_factor != 1 is not supported by the GGUF exporter")


def context_length(cfg, fam: Family) -> int:
    """Mistral is written without its sliding window: valid up to the window, where both attentions agree."""
    n = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    return min(n, int(window)) if fam.sliding == "cap" and window else n


def add_family_hparams(w: gguf.GGUFWriter, cfg, fam: Family) -> None:
    """The keys beyond the common ones (written by ``gguf_export._add_hparams``)."""
    window = getattr(cfg, "sliding_window", None)
    if fam.sliding == "key" and window:
        w.add_sliding_window(int(window))
    if fam.softcaps:  # llama.cpp's Gemma 2 always soft-caps (c·tanh(z/c)); "off" = c so large that it is z to fp32 rounding
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            add(float(getattr(cfg, key, None) or NO_SOFTCAP))
    if fam.arch == A.PHI3:
        w.add_rope_scaling_orig_ctx_len(int(getattr(cfg, "original_max_position_embeddings", None)
                                            or cfg.max_position_embeddings))


def fix_tensor(hf_name: str, t, cfg, fam: Family):
    """The tensor as llama.cpp reads it (fp32 torch tensor in, fp32 torch tensor out)."""
    if fam.norm_plus_one and hf_name.endswith("norm.weight"):
        return t + 1.0
    if fam.permute_qk and ".self_attn.q_proj." in hf_name:
        return permute_qk(t, cfg.num_attention_heads)
    if fam.permute_qk and ".self_attn.k_proj." in hf_name:
        return permute_qk(t, cfg.num_key_value_heads or cfg.num_attention_heads)
    return t

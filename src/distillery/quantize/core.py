"""Weight-only symmetric quantization maths: int8 per channel, int4 per group (the GGUF grids).

Why hand-written and not torchao: torchao 0.18 (the release that matches torch 2.13) quantizes
int8 weight-only on CPU, but its int4 weight-only path needs the ``mslk`` GPU kernel package and
fails on CPU; its tensor subclasses also do not round-trip through plain safetensors. What we need is
small: one grid per width, chosen to be *the same grid llama.cpp uses*, so a quantization-aware
student trained against it exports to GGUF without a second rounding error.

Grids (``w`` is one group of weights; a group is a whole row when ``group_size`` is None):

* ``bits=8``: ``d = max|w| / 127``, ``q = round_half_away(w / d)`` in [-127, 127] (GGUF ``Q8_0``
  with group 32).
* ``bits=4``: ``m`` = the element of largest magnitude, *with its sign*; ``d = m / -8``,
  ``q = clamp(floor(w / d + 8.5), 0, 15) - 8`` in [-8, 7]; ``m`` itself maps to -8 exactly (GGUF
  ``Q4_0`` with group 32). Symmetric: no zero point, and ``d`` may be negative.

Weights are ``(out_features, in_features)``; groups run along ``in_features``. Dequantized weight:
``q * d`` broadcast over each group.
"""

from __future__ import annotations

import torch

from ..errors import DistilleryError

SUPPORTED_BITS = (8, 4)


def default_group_size(bits: int) -> int | None:
    """Per-channel (None) for int8, 32 for int4 (the GGUF Q4_0 block)."""
    return None if bits == 8 else 32


def _groups(w: torch.Tensor, group_size: int | None, name: str = "weight") -> torch.Tensor:
    """View ``(O, I)`` as ``(O, I // g, g)``; g = I when ``group_size`` is None."""
    if w.dim() != 2:
        raise DistilleryError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = in_f if group_size is None else int(group_size)
    if g <= 0 or in_f % g:
        raise DistilleryError(f"{name}: in_features={in_f} is not a multiple of group_size={group_size}")
    return w.reshape(out_f, in_f // g, g)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``(O, I)`` weight; return ``(q (O, I) int8, scales (O, I // g) float32)``."""
    if bits not in SUPPORTED_BITS:
        raise DistilleryError(f"bits={bits} is not supported (choose 8 or 4)")
    wg = _groups(w.detach().float(), group_size, name)                      # (O, G, g)
    if bits == 8:
        d = wg.abs().amax(-1, keepdim=True) / 127.0                          # (O, G, 1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        a = (wg * inv).abs()
        q = torch.sign(wg) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a))))  # round half away from 0
    else:
        idx = wg.abs().argmax(-1, keepdim=True)
        d = torch.gather(wg, -1, idx) / -8.0                                 # signed: max element -> -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.clamp(torch.floor(wg * inv + 8.5), 0, 15) - 8
    return q.to(torch.int8).reshape(w.shape), d.squeeze(-1)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: ``(O, I)`` int8 codes and ``(O, G)`` scales → weight."""
    out_f, in_f = q.shape
    n_groups = scales.shape[-1]
    w = q.reshape(out_f, n_groups, in_f // n_groups).to(dtype) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(out_f, in_f)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
                  scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype (no gradient). ``scale_dtype=float16`` reproduces GGUF
    exactly (GGUF stores block scales as fp16)."""
    q, d = quantize_weight(w, bits, group_size)
    return dequantize_weight(q, d.to(scale_dtype).float()).to(w.dtype)


def fake_quantize_ste(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Fake-quantized weight with a straight-through gradient: forward = ``fake_quantize(w)``,
    backward = identity (d out / d w = 1), so the fp32 latent weight keeps learning."""
    return w + (fake_quantize(w, bits, group_size) - w).detach()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes in [-8, 7], shape ``(O, I)`` with even I, into ``(O, I // 2)`` uint8
    (low nibble = even column, high nibble = odd column, each stored as code + 8)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(O, I // 2)`` uint8 → ``(O, I)`` int8 codes."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)

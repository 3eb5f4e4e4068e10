"""Weight-only quantization grids: symmetric (GGUF Q8_0/Q4_0) and affine (MLX ``mx.quantize``).

Why hand-written and not torchao: torchao 0.18 (the release that matches torch 2.13) quantizes
int8 weight-only on CPU, but its int4 weight-only path needs the ``mslk`` GPU kernel package and
fails on CPU; its tensor subclasses also do not round-trip through plain safetensors. What we need is
small: one grid per width, chosen to be *the same grid the runtime uses*, so a quantization-aware
student trained against it exports without a second rounding error.

Weights are ``(out_features, in_features)``; groups run along ``in_features`` (a group is a whole row
when ``group_size`` is None). ``w`` below is one group.

``scheme="symmetric"`` (GGUF, llama.cpp), dequantized weight ``q * d``:

* ``bits=8``: ``d = max|w| / 127``, ``q = round_half_away(w / d)`` in [-127, 127] (GGUF ``Q8_0``
  with group 32).
* ``bits=4``: ``m`` = the element of largest magnitude, *with its sign*; ``d = m / -8``,
  ``q = clamp(floor(w / d + 8.5), 0, 15) - 8`` in [-8, 7]; ``m`` itself maps to -8 exactly (GGUF
  ``Q4_0`` with group 32). No zero point, and ``d`` may be negative.

``scheme="affine"`` (MLX ``mx.quantize(w, group_size, bits)``, mode "affine"; bits 2, 3, 4, 6, 8,
groups of 32, 64 or 128), dequantized weight ``s * q + b`` with ``q`` in [0, 2^bits - 1]. In fp32,
exactly as MLX's kernel computes it (mlx/backend/cpu/quantized.cpp)::

    n = 2^bits - 1;  lo, hi = min(w), max(w)
    s = max((hi - lo) / n, 1e-7), negated unless |lo| > |hi|
    e = lo if |lo| > |hi| else hi          # the edge of larger magnitude
    q0 = rint(e / s);  if q0 != 0: s = e / q0, b = e   else: b = 0
    q = clamp(rint((w - b) / s), 0, n)     # rint: round half to even

``e`` maps to code 0 and the value 0 to the integer code ``-q0`` (zero is exact). ``clip="mse"``
first clamps each group to ``[r·lo, r·hi]``, ``r`` from :data:`CLIP_RATIOS` chosen per group to
minimise ``‖fq(clamp(w)) − w‖²`` (AWQ/llama.cpp-style range search); the clamped weight's own min/max
grid is then the clipped one, so MLX re-quantizing the clamped weights lands on the same values. Scales and biases
are stored in the weight's dtype (``dtype`` argument: float32, or float16/bfloat16 as MLX stores
them for a half-precision model). Packed codes (:func:`pack_bits`) are MLX's layout: a little-endian
bit stream per row, code ``k`` in bits ``[k·bits, (k+1)·bits)``, viewed as uint32.
"""

from __future__ import annotations

import torch

from ..errors import DistilleryError

SYMMETRIC_BITS = (8, 4)
AFFINE_BITS = (2, 3, 4, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize accepts
SUPPORTED_BITS = (2, 3, 4, 6, 8)
SCHEMES = ("symmetric", "affine")
CLIPS = ("none", "mse")
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5 of each group's range


def resolve_scheme(bits: int, scheme: str | None = None) -> str:
    """``scheme`` checked against ``bits``; None/'auto': symmetric for 8 and 4 (GGUF), affine below (MLX)."""
    if scheme in (None, "auto"):
        scheme = "symmetric" if bits in SYMMETRIC_BITS else "affine"
    if scheme not in SCHEMES:
        raise DistilleryError(f"quantization scheme '{scheme}' is not known (choose symmetric or affine)")
    allowed = SYMMETRIC_BITS if scheme == "symmetric" else AFFINE_BITS
    if bits not in allowed:
        raise DistilleryError(f"bits={bits} is not supported by the {scheme} scheme "
                              f"(choose {', '.join(map(str, sorted(allowed)))})")
    return scheme


def default_group_size(bits: int, scheme: str | None = None) -> int | None:
    """Per-channel (None) for symmetric int8; 32 otherwise (GGUF's Q4_0 block, MLX's smallest group)."""
    return None if resolve_scheme(bits, scheme) == "symmetric" and bits == 8 else 32


def check_group_size(scheme: str, group_size: int | None, name: str = "group_size") -> None:
    """The affine grid exists only for the group sizes MLX runs (a runtime must run what we claim)."""
    if scheme == "affine" and group_size not in AFFINE_GROUP_SIZES:
        raise DistilleryError(f"{name}={group_size}: the affine (MLX) scheme needs groups of 32, 64 or 128")


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
    """Symmetric grid: quantize a ``(O, I)`` weight; return ``(q (O, I) int8, scales (O, I // g) float32)``."""
    if bits not in SYMMETRIC_BITS:
        raise DistilleryError(f"bits={bits} is not supported by the symmetric scheme (choose 8 or 4)")
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


def affine_quantize(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float32,
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine (MLX) grid: return ``(q (O, I) uint8 codes, scales (O, G), biases (O, G))``, scales and
    biases in ``dtype``. Equals ``mx.quantize(w.astype(dtype), group_size, bits)`` (codes unpacked)."""
    resolve_scheme(bits, "affine")
    check_group_size("affine", group_size, name=f"{name}: group_size")
    wg = _groups(w.detach().to(dtype).float(), group_size, name)              # (O, G, g), fp32 maths
    n_bins = float(2 ** bits - 1)
    hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)           # (O, G, 1)
    low_edge = lo.abs() > hi.abs()
    s = torch.clamp((hi - lo) / n_bins, min=1e-7)
    s = torch.where(low_edge, s, -s)
    edge = torch.where(low_edge, lo, hi)
    q0 = torch.round(edge / s)                                               # torch.round = rint (half to even)
    nonzero = q0 != 0
    s = torch.where(nonzero, edge / torch.where(nonzero, q0, torch.ones_like(q0)), s)
    b = torch.where(nonzero, edge, torch.zeros_like(edge))
    q = torch.clamp(torch.round((wg - b) / s), 0, n_bins)
    return q.to(torch.uint8).reshape(w.shape), s.squeeze(-1).to(dtype), b.squeeze(-1).to(dtype)


def affine_dequantize(q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`affine_quantize`: ``s * q + b`` per group, computed in ``scales``' dtype as MLX
    does, returned as ``dtype``; ``(O, I)`` codes with ``(O, G)`` scales and biases → ``(O, I)``."""
    out_f, in_f = q.shape
    n_groups = scales.shape[-1]
    qg = q.reshape(out_f, n_groups, in_f // n_groups).to(scales.dtype)
    return (scales.unsqueeze(-1) * qg + biases.unsqueeze(-1)).reshape(out_f, in_f).to(dtype)


@torch.no_grad()
def affine_clip(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w`` clamped per group to ``[r·lo, r·hi]`` with the ratio ``r`` (of :data:`CLIP_RATIOS`) that
    minimises the group's squared affine-grid error; ``(O, I)`` in, ``(O, I)`` out (``w``'s dtype).
    Quantizing the result with the plain grid gives the clipped grid (its extremes are ``r·lo, r·hi``)."""
    wg = _groups(w.detach().to(dtype).float(), group_size)                  # (O, G, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best, best_err = wg, torch.full_like(lo, float("inf"))
    for r in CLIP_RATIOS:
        c = torch.minimum(torch.maximum(wg, lo * r), hi * r).reshape(w.shape)
        q, s, b = affine_quantize(c, bits, group_size, dtype=dtype)
        err = ((affine_dequantize(q, s, b) - w.float()) ** 2).reshape(wg.shape).sum(-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, c.reshape(wg.shape), best)
        best_err = torch.where(better, err, best_err)
    return best.reshape(w.shape).to(w.dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
                  scale_dtype: torch.dtype = torch.float32, scheme: str | None = None,
                  clip: str = "none") -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype (no gradient). ``scheme`` None: see :func:`resolve_scheme`.
    Symmetric: ``scale_dtype=float16`` reproduces GGUF exactly (GGUF stores block scales as fp16).
    Affine: ``scale_dtype`` is the dtype MLX holds the weight, scales and biases in; ``clip="mse"``
    quantizes :func:`affine_clip` ``(w)`` instead of ``w``."""
    if clip not in CLIPS:
        raise DistilleryError(f"clip '{clip}' is not known (choose none or mse)")
    if resolve_scheme(bits, scheme) == "affine":
        if clip == "mse":
            w = affine_clip(w, bits, group_size, dtype=scale_dtype)
        q, s, b = affine_quantize(w, bits, group_size, dtype=scale_dtype)
        return affine_dequantize(q, s, b, w.dtype)
    if clip != "none":
        raise DistilleryError("clip='mse' is for the affine scheme (GGUF's Q4_0/Q8_0 grids fix their own range)")
    q, d = quantize_weight(w, bits, group_size)
    return dequantize_weight(q, d.to(scale_dtype).float()).to(w.dtype)


def fake_quantize_ste(w: torch.Tensor, bits: int, group_size: int | None = None,
                      scheme: str | None = None, clip: str = "none") -> torch.Tensor:
    """Fake-quantized weight with a straight-through gradient: forward = ``fake_quantize(w)``,
    backward = identity (d out / d w = 1), so the fp32 latent weight keeps learning."""
    return w + (fake_quantize(w, bits, group_size, scheme=scheme, clip=clip) - w).detach()


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(O, I)`` codes in [0, 2^bits) into ``(O, I·bits/32)`` uint32, MLX's layout (see module doc)."""
    out_f, in_f = q.shape
    if (in_f * bits) % 32:
        raise DistilleryError(f"in_features={in_f} at {bits} bits does not fill whole 32-bit words")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((q.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(out_f, -1, 32)  # (O, W, 32) bits
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)                    # (O, W) in [0, 2^32)
    return words.to(torch.uint32)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(O, W)`` uint32 → ``(O, W·32/bits)`` uint8 codes."""
    words = packed.to(torch.int64)
    stream = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).reshape(packed.shape[0], -1, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1).to(torch.uint8)


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

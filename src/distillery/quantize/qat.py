"""Quantization-aware distillation: train linear layers through fake-quantized weights (STE).

``qat_wrap(model, bits, group_size, scheme)`` registers a ``torch.nn.utils.parametrize`` parametrization on
the weight of every ``nn.Linear`` (the LM head excluded by default): each forward then sees
``fake_quantize(w)`` while gradients flow to the fp32 latent weight unchanged (straight-through
estimator). The latent ``nn.Parameter`` objects are kept (moved to
``module.parametrizations.weight.original``), so an optimizer built before wrapping keeps updating
them. ``qat_unwrap(model)`` removes the parametrizations and leaves the *latent* fp32 weights in
place (quantize or export afterwards with the same bits, group size and scheme: the grid is a pure
function of the weight, so ``distillery quantize`` then reproduces exactly what training saw; the
grids match GGUF Q8_0/Q4_0 and MLX's affine ``mx.quantize``, see ``core``).

At 2 and 3 bits the grid is MLX's affine one (``scheme=None`` picks it); the student is trained through
it with the teacher's distribution as the target (``qat.enabled`` in a recipe), which is what moves a
2/3-bit student back near its fp32 perplexity where post-training rounding alone does not
(benchmarks/lowbit.py).

Call it for the last N steps of training; save only after ``qat_unwrap`` (a parametrized module's
state dict has different keys).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import DistilleryError
from .core import (AFFINE_BITS, CLIPS, affine_clip, check_group_size, default_group_size, fake_quantize_ste,
                   resolve_scheme)


class FakeQuantSTE(nn.Module):
    """Parametrization: weight ``(O, I)`` → fake-quantized weight, identity gradient."""

    def __init__(self, bits: int, group_size: int | None, scheme: str, clip: str = "none"):
        super().__init__()
        self.bits, self.group_size, self.scheme, self.clip = bits, group_size, scheme, clip

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(weight, self.bits, self.group_size, scheme=self.scheme, clip=self.clip)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, scheme={self.scheme}, clip={self.clip}"


def _lm_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def quant_targets(model: nn.Module, include_lm_head: bool = False, embeddings: bool = False) -> dict[str, nn.Module]:
    """The modules whose ``weight`` gets quantized, by name: every ``nn.Linear`` but the LM head (unless
    ``include_lm_head``); with ``embeddings`` also the input embedding and the LM head, as
    ``mlx_lm.convert -q`` does (a tied pair shares one weight: both modules are listed, it is one tensor)."""
    head = _lm_head(model)
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) and embeddings else None
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and (m is not head or include_lm_head or embeddings))
            or (emb is not None and m is emb)}


def embedding_names(model: nn.Module) -> set[str]:
    """Names of the input embedding and the output head (LM head, tied or not): the tensors
    ``embedding_bits`` applies to (llama.cpp's Q2_K/Q3_K keep ``output.weight`` at Q6_K/Q4_K)."""
    wanted = {id(m) for m in (_lm_head(model), getattr(model, "get_input_embeddings", lambda: None)())
              if m is not None}
    return {name for name, m in model.named_modules() if id(m) in wanted}


def check_embedding_bits(embedding_bits: int | None, scheme: str, embeddings: bool, where: str = "embedding_bits") -> None:
    """``embedding_bits`` is a width of MLX's affine grid, for a run that quantizes the embedding/head."""
    if embedding_bits is None:
        return
    if embedding_bits not in AFFINE_BITS:
        raise DistilleryError(f"{where}={embedding_bits} is not a width of MLX's affine grid (choose 2, 3, 4, 6 or 8)")
    if scheme != "affine":
        raise DistilleryError(f"{where}={embedding_bits} needs the affine scheme (this run is {scheme})")
    if not embeddings:
        raise DistilleryError(f"{where}={embedding_bits} with the embeddings kept fp32: drop one of the two")


def qat_wrap(model: nn.Module, bits: int = 4, group_size: int | None = -1,
             include_lm_head: bool = False, scheme: str | None = None, clip: str = "none",
             embeddings: bool | None = None, embedding_bits: int | None = None) -> list[str]:
    """Make every ``nn.Linear`` of ``model`` use fake-quantized weights in forward; return their names.

    ``scheme`` None or 'auto': symmetric (GGUF) for 8 and 4 bits, affine (MLX) for 2, 3 and 6.
    ``embeddings`` None: True for the affine scheme, False for symmetric — the input embedding and
    the LM head are quantized too, as ``mlx_lm.convert -q`` does (llama.cpp keeps them at higher
    precision); the student then trains against the whole model the runtime runs.
    ``group_size=-1`` means the default (per channel for symmetric 8, else 32); ``None`` means per
    channel (symmetric only). ``clip="mse"`` (affine only): each forward quantizes the range-searched
    clamp of the weight (``core.affine_clip``), and :func:`qat_unwrap` writes that clamp into the
    latent weights, so the plain grid of the result is still exactly what training saw.
    ``embedding_bits`` (affine only; None: ``bits``): the width of the input embedding and the LM head
    (:func:`embedding_names`), e.g. 4 beside 2-bit layers, as Apple's 2-bit on-device model keeps a
    4-bit embedding table; the linears keep ``bits``. Layers whose
    ``in_features`` the group size does not divide raise ``DistilleryError``. Wrapping twice is an error.
    """
    if clip not in CLIPS:
        raise DistilleryError(f"qat clip '{clip}' is not known (choose none or mse)")
    try:
        scheme = resolve_scheme(bits, scheme)
    except DistilleryError as err:
        raise DistilleryError(f"qat: {err}") from None
    group_size = default_group_size(bits, scheme) if group_size == -1 else group_size
    check_group_size(scheme, group_size, name="qat group_size")
    if clip != "none" and scheme != "affine":
        raise DistilleryError(f"qat clip '{clip}' needs the affine scheme (bits {bits} is {scheme} here)")
    embeddings = scheme == "affine" if embeddings is None else embeddings
    check_embedding_bits(embedding_bits, scheme, embeddings, "qat embedding_bits")
    high = embedding_names(model) if embedding_bits is not None else set()
    wrapped = []
    for name, module in quant_targets(model, include_lm_head, embeddings).items():
        if parametrize.is_parametrized(module, "weight"):
            raise DistilleryError(f"{name}: already wrapped for QAT (call qat_unwrap first)")
        in_features = module.weight.shape[1]
        if group_size is not None and in_features % group_size:
            raise DistilleryError(f"{name}: in_features={in_features} is not a multiple of group_size={group_size}")
        b = embedding_bits if name in high else bits
        parametrize.register_parametrization(module, "weight", FakeQuantSTE(b, group_size, scheme, clip), unsafe=True)
        wrapped.append(name)
    return wrapped


def qat_unwrap(model: nn.Module) -> list[str]:
    """Remove the QAT parametrizations, keeping the latent fp32 weights (clamped to the searched range
    when ``clip="mse"``); return the unwrapped names."""
    unwrapped, baked = [], set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and parametrize.is_parametrized(module, "weight"):
            fq = module.parametrizations.weight[0]
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            if getattr(fq, "clip", "none") != "none" and id(module.weight) not in baked:  # a tied weight once
                baked.add(id(module.weight))
                with torch.no_grad():
                    module.weight.copy_(affine_clip(module.weight, fq.bits, fq.group_size))
            unwrapped.append(name)
    return unwrapped

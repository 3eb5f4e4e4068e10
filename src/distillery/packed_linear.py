"""``PackedLinear``: a linear map whose weight is packed once into oneDNN's blocked layout, for the few-row GEMMs
of a decode step (why and what it measured: :mod:`distillery.static_decode`). Its own module because the decoder
and the bf16-screened head (:mod:`distillery.screened_head`) both use it, and the decoder imports the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _packing_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear:
    """``y = x @ weightᵀ + bias`` for ``x (b, in)``, with ``weight (out, in)`` packed once for oneDNN (CPU), or
    plain ``F.linear`` where packing is unavailable (GPU, other dtypes, a torch without the op).

    ``weight`` is read once, here: later changes to the source tensor are not seen (``sample`` packs per call).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, dtype: torch.dtype | None = None):
        weight = weight.detach().to(dtype or weight.dtype)
        self.bias = None if bias is None else bias.detach().to(weight.dtype)
        self.weight, self.packed = weight, None
        if _packing_available(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            except RuntimeError:  # a oneDNN build without this layout: the plain product is still right
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

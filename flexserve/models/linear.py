"""The one `linear` every projection of the layer math calls: plain, quantised, or fused 4-bit on a GPU.

The quantised storage and its portable math live in `flexserve.compression` (layer 3), the Triton kernels in
`flexserve.kernels` (layer 3 too); the model layer is the first that may use both, so the choice between them
is made here: a 4-bit weight meeting a decode-sized activation on a GPU goes to the fused
dequantise-and-multiply kernel (the matrix is never rebuilt in fp16), everything else to
`compression.linear.linear`, which rounds the activations of the fp8 and int8 schemes with the fused per-token
kernel on a GPU (`kernels.act_quant`) and with the same math in PyTorch elsewhere.
"""
from __future__ import annotations

import torch

from ..compression.linear import linear as quantized_linear
from ..compression.linear import smoothed
from ..compression.qweight import Int4Weight
from ..kernels.act_quant import per_token_quant, per_token_quant_available
from ..kernels.dequant_matmul import int4_matmul, is_fused_int4_shape


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T (+ bias) -> [..., N], for a tensor or any `QuantWeight` (see module docstring)."""
    if isinstance(weight, Int4Weight) and is_fused_int4_shape(x, weight.in_features, weight.group_size):
        y = int4_matmul(smoothed(x, weight.smooth), weight.data, weight.scale, weight.min)
        return y if bias is None else y + bias
    if isinstance(weight, torch.Tensor):
        return quantized_linear(x, weight, bias)
    return quantized_linear(x, weight, bias, per_token_quant if per_token_quant_available(x) else None)

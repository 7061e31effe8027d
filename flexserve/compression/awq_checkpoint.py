"""An AutoAWQ checkpoint's 4-bit projections as flexserve's `Int4Weight`, without rounding anything.

Why: an AWQ folder (`flexserve.weights.awq_blocks` reads its format) is already quantised in 4-bit groups
along the input dimension with a zero point, which is `Int4Weight`'s form: W[n, k] = (q - z) * s is
min + q * s with min = -z * s. Keeping the checkpoint's numbers (`--quantization awq-checkpoint`, the default
for such a folder) holds the model at about its file size and gives exactly the dequantised checkpoint's outputs.

Scales stay as stored (float16); the min is kept in float32, where -z * s is exact (a 4-bit integer times an
11-bit significand) while float16 would round it. Rebuilt in float32, q * s is exact too and so is the sum,
since (q - z) * s is itself a float32 value: every value equals the checkpoint's formula bit for bit, but for
the sign of a zero when a scale is negative (+0.0 here, -0.0 by the formula); AWQ's scales are positive. The
memory cost is 4 bits per value plus 6 bytes per group (4.375 bits per value at AWQ's usual group of 128).
"""
from __future__ import annotations

import torch

from ..errors import ModelLoadError
from .qweight import Int4Weight


def awq_checkpoint_weight(levels: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    """The `Int4Weight` of an AWQ projection given in `nn.Linear`'s orientation: `levels` uint8 [N, K] and
    `zeros` uint8 [N, K / G] in [0, 15], `scales` [N, K / G] (what `AWQBlocks.unpacked` gives)."""
    n, k = levels.shape
    num_groups = zeros.shape[1] if zeros.dim() == 2 else 0
    group = k // num_groups if num_groups else 0
    if (num_groups == 0 or group * num_groups != k or group % 2 or tuple(zeros.shape) != (n, num_groups)
            or tuple(scales.shape) != (n, num_groups) or levels.dtype != torch.uint8 or zeros.dtype != torch.uint8):
        raise ModelLoadError(f"AWQ levels {tuple(levels.shape)} {levels.dtype}, zeros {tuple(zeros.shape)} "
                             f"{zeros.dtype} and scales {tuple(scales.shape)} do not make groups of one even size")
    if bool((levels > 15).any()) or bool((zeros > 15).any()):
        raise ModelLoadError("AWQ levels and zero points must be 4-bit values in [0, 15]")
    q = levels.reshape(n, num_groups, group)  # [N, G, group]
    half = group // 2
    data = (q[..., :half] | (q[..., half:] << 4)).contiguous()  # [N, G, group/2]: value j low, j + half high
    scale = scales.reshape(n, num_groups, 1).contiguous()  # [N, G, 1], as stored
    low = (zeros.float() * scales.float()).neg_().reshape(n, num_groups, 1)  # [N, G, 1] float32, exact
    return Int4Weight(data, scale, low, k)

"""`linear(x, weight, bias)`: one projection over a plain tensor or any quantised weight.

The model math calls this for every projection, so a scheme changes what the weight dict holds, never the
layer code. Per scheme:

- fp8: the activation is rounded to e4m3 with one scale per token (dynamic). On a GPU of compute capability
  8.9 or newer the product is `torch._scaled_mm` with row-wise scales; elsewhere the same rounding is applied
  and both operands are dequantised for an ordinary matmul, so the CPU sees the same numbers.
- int8: the activation (divided by its smoothing factor) is rounded to int8 per token; the int8 x int8
  product accumulates in int32 (`torch._int_mm` on a GPU; on a CPU an exact float64 matmul, since every
  partial sum is an integer below 2**53) and is rescaled by the token and channel scales.
- 4-bit (rtn4, awq, a GGUF file's Q4_0/Q4_1 under gguf): weight-only; the CPU path dequantises and multiplies.
  The GPU decode path that never rebuilds the matrix is the fused kernel in `flexserve.kernels.dequant_matmul`,
  chosen by the model layer.
- 8-bit groups (a GGUF file's Q8_0 under gguf): weight-only, dequantised and multiplied on every device.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .qweight import FP8_DTYPE, FP8_MAX, INT8_MAX, Fp8Weight, Int4Weight, Int8GroupWeight, Int8Weight

_INT_MM_MIN_ROWS = 17  # torch._int_mm needs more than 16 rows


# Per-token activation quantiser: x [M, K], the 8-bit dtype, its largest magnitude -> (8-bit x, float32 scales
# [M, 1]). The default is the portable PyTorch math below; the model layer passes the fused GPU kernel, which
# returns the same bits.
ActQuantizer = Callable[[torch.Tensor, torch.dtype, float], "tuple[torch.Tensor, torch.Tensor]"]


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           quantize: ActQuantizer | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T (+ bias) -> [..., N] in x's dtype, whatever form `weight` is stored in.

    A weight that is neither a tensor nor a known quantised type may supply `linear(x, bias)` itself
    (calibration wraps weights this way to observe their inputs). `quantize` rounds the activation of the fp8
    and int8 schemes (default: `per_token`)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    if isinstance(weight, Fp8Weight):
        return _add_bias(fp8_linear(x, weight, quantize or per_token), bias)
    if isinstance(weight, Int8Weight):
        return _add_bias(int8_linear(x, weight, quantize or per_token), bias)
    if isinstance(weight, (Int4Weight, Int8GroupWeight)):  # weight-only: rebuild the matrix, then multiply
        return F.linear(x, weight.dequantize(x.dtype), bias)  # the dequantised matrix carries 1 / smooth
    return weight.linear(x, bias)


def smoothed(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """x divided by a per-channel smoothing factor (the factor the weight was multiplied by)."""
    return x if smooth is None else x / smooth.to(x.dtype)


def _per_token(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] in float32 scaled so that each row's largest magnitude is `qmax`, and the scales [M, 1]."""
    # times the float32 reciprocal, not divided by qmax: the one rounding the fused kernel repeats exactly
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min_(1e-12).mul_(1.0 / qmax)
    return x.float() / scale, scale


def per_token(x: torch.Tensor, dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (`dtype` [M, K], float32 scales [M, 1]), each row's largest magnitude at `qmax`; an integer
    dtype is rounded to nearest (ties to even) first, a float8 one by the cast."""
    scaled, scale = _per_token(x, qmax)
    if not dtype.is_floating_point:
        scaled.round_()
    return scaled.clamp_(-qmax, qmax).to(dtype), scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with each row's largest magnitude at 448."""
    return per_token(x, FP8_DTYPE, FP8_MAX)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], float32 scales [M, 1]), symmetric, each row's largest magnitude at 127."""
    return per_token(x, torch.int8, INT8_MAX)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, quantize: ActQuantizer = per_token) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    xq, xs = quantize(x2, FP8_DTYPE, FP8_MAX)
    if _has_scaled_mm(x.device) and k % 16 == 0 and w.shape[0] % 16 == 0:
        y = torch._scaled_mm(xq, w.weight.t(), scale_a=xs, scale_b=w.scale.t(), out_dtype=x.dtype)
    else:  # the same rounded operands, multiplied in the activation's dtype
        y = (xq.to(x.dtype) @ w.weight.to(x.dtype).t()) * xs.to(x.dtype) * w.scale.t().to(x.dtype)
    return y.to(x.dtype).reshape(*lead, -1)


def int8_linear(x: torch.Tensor, w: Int8Weight, quantize: ActQuantizer = per_token) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = quantize(smoothed(x, w.smooth).reshape(-1, k), torch.int8, INT8_MAX)  # [M, K] int8, [M, 1]
    acc = int8_matmul(xq, w.weight)  # [M, N] exact integer sums
    return (acc.float() * xs * w.scale.t()).to(x.dtype).reshape(*lead, -1)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ w [N, K].T int8 -> [M, N] int32 sums, exact on every device."""
    if a.is_cuda and a.shape[1] % 8 == 0 and w.shape[0] % 8 == 0:
        m = a.shape[0]
        if m < _INT_MM_MIN_ROWS:  # pad the rows up to what the kernel takes; the extra rows are dropped
            a = torch.cat([a, a.new_zeros(_INT_MM_MIN_ROWS - m, a.shape[1])])
        return torch._int_mm(a, w.t())[:m]
    # |sum| <= 127 * 127 * K < 2**53 for any K below 5e11: float64 holds every partial sum exactly
    return (a.double() @ w.double().t()).to(torch.int32)


@functools.cache
def _has_scaled_mm(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias

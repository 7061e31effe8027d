"""Per-token activation quantisation for the fp8 and int8 matmuls, fused into one kernel.

Why: an fp8 (or int8) projection first rounds its activation to 8 bits with one scale per token. Written in
PyTorch that is six passes over the activation in float32 (absolute value, row maximum, upcast, divide, clamp,
cast), which at a prefill step's thousands of tokens move as many bytes as the 8-bit GEMM saves in math. Here
one program per token row reads the row twice (its maximum, then the scaled values) and writes the 8-bit row
and its scale once.

The result is the portable path's (`flexserve.compression.linear.per_token`) bit for bit: the same float32
scale (row maximum, floored at 1e-12, times the reciprocal of the 8-bit maximum), the same correctly rounded
float32 division, clamp, and rounding to nearest with ties to even. The GPU test holds the two equal.
"""
from __future__ import annotations

import torch

from .fused import fused_available

try:  # the CPU wheel of torch has no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_BLOCK = 1024  # columns per pass: rows of any width loop over it


def per_token_quant_available(x: torch.Tensor) -> bool:
    """The fused kernel can quantise x: CUDA, Triton, fused kernels not switched off, a 16-bit or float32
    activation."""
    return fused_available(x) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:
    @triton.jit
    def _per_token_quant_kernel(X, Q, S, n, stride_x, stride_q, qmax, inv_qmax, BLOCK: tl.constexpr,
                                ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        peak = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(X + row * stride_x + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)
            peak = tl.maximum(peak, tl.abs(x))
        scale = tl.maximum(tl.max(peak, 0), 1e-12) * inv_qmax
        tl.store(S + row, scale)
        for start in range(0, n, BLOCK):
            live = start + cols < n
            x = tl.load(X + row * stride_x + start + cols, mask=live, other=0.0).to(tl.float32)
            # IEEE division (div_rn): Triton's `/` is the approximate one, a unit in the last place off at times
            y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -qmax), qmax)
            if ROUND:  # to the nearest integer, ties to even (torch.round): exact for |y| <= 127
                r = tl.floor(y + 0.5)
                tie_to_odd = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
                y = tl.where(tie_to_odd, r - 1.0, r)
            tl.store(Q + row * stride_q + start + cols, y.to(Q.dtype.element_ty), mask=live)


def per_token_quant(x: torch.Tensor, out_dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (8-bit [M, K] of `out_dtype`, float32 scales [M, 1]), each row scaled so that its largest
    magnitude is `qmax`; integer outputs are rounded to nearest (ties to even), float8 ones by the cast's own
    rounding to nearest. The caller checks `per_token_quant_available` (or runs on the Triton interpreter)."""
    if x.dim() != 2:
        raise ValueError(f"expected a [tokens, features] activation, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=out_dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _per_token_quant_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), float(qmax), 1.0 / qmax,
                                      BLOCK=_BLOCK, ROUND=not out_dtype.is_floating_point, num_warps=4)
    return q, scale

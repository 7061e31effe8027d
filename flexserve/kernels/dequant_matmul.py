"""Fused dequantise-and-multiply for 4-bit group-wise weights at decode sizes (a few rows of activations).

Why: a decode step multiplies a handful of rows by every weight matrix, so it is bound by reading the weights.
Dequantising a 4-bit matrix to fp16 first writes and re-reads four times the bytes it saves; this kernel reads
the packed bytes once and never builds the fp16 matrix. For each output channel n and group g of the input:

    sum_j (min[n, g] + q[n, g, j] * scale[n, g]) * x[g*G + j] = scale[n, g] * sum_j q[n, g, j] x[g*G + j]
                                                              + min[n, g] * sum_j x[g*G + j]

so each group costs one integer-weighted dot product and two multiply-adds. The weight layout is that of
`flexserve.compression.qweight.Int4Weight`: data uint8 [N, G, group/2] with value j in the low nibble of byte
j and value j + group/2 in its high nibble; scale and min [N, G, 1].

`int4_matmul_reference` is the portable path (and what the GPU test compares the kernel with); larger batches
(prefill) are compute-bound and go through a dequantised matmul instead (`is_fused_int4_shape`).
"""
from __future__ import annotations

import torch

from .fused import fused_available, triton

if triton is not None:
    import triton.language as tl

MAX_FUSED_ROWS = 16  # above this many activation rows the matmul is compute-bound: dequantise and use cuBLAS
BLOCK_N = 64


def is_fused_int4_shape(x: torch.Tensor, in_features: int, group_size: int) -> bool:
    """Whether the fused kernel takes this product: CUDA with Triton, decode-sized, whole power-of-two groups."""
    rows = x.numel() // max(x.shape[-1], 1)
    half = group_size // 2
    return (fused_available(x) and rows <= MAX_FUSED_ROWS and in_features % group_size == 0
            and half >= 16 and half & (half - 1) == 0)


def int4_matmul_reference(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor
                          ) -> torch.Tensor:
    """x [..., K] @ W.T for the packed 4-bit W (module docstring), W rebuilt in x's dtype."""
    n, num_groups, half = data.shape
    levels = torch.cat([data & 0x0F, data >> 4], dim=-1)  # [N, G, group]: the low nibbles come first
    w = (min_.float() + levels.float() * scale.float()).reshape(n, num_groups * 2 * half)  # [N, K]
    return x @ w.to(x.dtype).t()


def int4_matmul(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype; the fused kernel where `is_fused_int4_shape`, else the
    reference."""
    n, num_groups, half = data.shape
    if not is_fused_int4_shape(x, num_groups * 2 * half, 2 * half):
        return int4_matmul_reference(x, data, scale, min_)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    data, scale, min_ = data.contiguous(), scale.contiguous(), min_.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)  # [M, N]
    if x2.shape[0]:
        grid = (triton.cdiv(n, BLOCK_N), x2.shape[0])
        _int4_gemv_kernel[grid](x2, data, scale, min_, y, n, num_groups, x2.stride(0), y.stride(0),
                                HALF=half, BLOCK_N=BLOCK_N, num_warps=4)
    return y.view(*x.shape[:-1], n)


if triton is not None:
    @triton.jit
    def _int4_gemv_kernel(X, D, S, Z, Y, N, num_groups, stride_xm, stride_ym,
                          HALF: tl.constexpr, BLOCK_N: tl.constexpr):
        # one program: one activation row m, BLOCK_N output channels, looping over the input groups
        m = tl.program_id(1).to(tl.int64)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = offs_n < N
        rows = offs_n.to(tl.int64)
        j = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for g in range(0, num_groups):
            x_lo = tl.load(X + m * stride_xm + g * 2 * HALF + j).to(tl.float32)  # [HALF]
            x_hi = tl.load(X + m * stride_xm + g * 2 * HALF + HALF + j).to(tl.float32)
            packed = tl.load(D + (rows[:, None] * num_groups + g) * HALF + j[None, :], mask=live[:, None],
                             other=0)  # [BLOCK_N, HALF] uint8
            lo = (packed & 0x0F).to(tl.float32)
            hi = (packed >> 4).to(tl.float32)
            dot = tl.sum(lo * x_lo[None, :] + hi * x_hi[None, :], axis=1)  # [BLOCK_N]
            x_sum = tl.sum(x_lo, axis=0) + tl.sum(x_hi, axis=0)
            sc = tl.load(S + rows * num_groups + g, mask=live, other=0).to(tl.float32)
            mn = tl.load(Z + rows * num_groups + g, mask=live, other=0).to(tl.float32)
            acc += sc * dot + mn * x_sum
        tl.store(Y + m * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=live)

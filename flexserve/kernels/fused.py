"""Fused elementwise kernels for the layer math: RMSNorm, rotary embedding, SiLU-gated MLP activation.

Why: written as plain PyTorch, each of these is a chain of small kernels (RMSNorm alone: cast, square, mean, add,
rsqrt, multiply, cast, multiply), each reading and writing the whole activation. On an H200 serving step that
chain took about a third of a prefill step's GPU time, next to matmuls that run near the tensor cores' rate. One
Triton kernel each reads its input once and writes its output once, computing in float32.

Each function has a portable reference (`*_reference`): the exact PyTorch code the layers ran before, used on
the CPU, on a GPU without Triton, and with FLEXSERVE_FUSED=0 (for A/B runs). The GPU test holds the two to the
rounding of the activation dtype (the kernels round once, the reference after every operation).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # the CPU wheel of torch has no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def fused_available(x: torch.Tensor) -> bool:
    """Triton kernels for this tensor: CUDA, Triton installed, not switched off by FLEXSERVE_FUSED=0."""
    return triton is not None and x.is_cuda and os.environ.get("FLEXSERVE_FUSED", "1") != "0"


# --- references (the CPU path) ----------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, as the reference implementations do, then back to the activation dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x [B, S, H, hd]; cos, sin broadcastable [B, S, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def silu_mul_reference(u: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: u [..., 2I] = [gate | up] -> silu(gate) * up [..., I]."""
    gate, up = u.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- kernels ----------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < n
        x = tl.load(X + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
        w = tl.load(W + cols, mask=live, other=0.0)
        y = (x * r).to(X.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=live)

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, heads, stride_xt, stride_xh, stride_ct, stride_yt, stride_yh,
                     HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # one token: all its heads
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HALF)
        live = (h < heads)[:, None]
        base = X + t * stride_xt + h[:, None] * stride_xh
        x1 = tl.load(base + d[None, :], mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + d[None, :], mask=live, other=0.0).to(tl.float32)
        c1 = tl.load(COS + t * stride_ct + d).to(tl.float32)[None, :]
        c2 = tl.load(COS + t * stride_ct + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(SIN + t * stride_ct + d).to(tl.float32)[None, :]
        s2 = tl.load(SIN + t * stride_ct + HALF + d).to(tl.float32)[None, :]
        out = Y + t * stride_yt + h[:, None] * stride_yh
        tl.store(out + d[None, :], (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=live)
        tl.store(out + HALF + d[None, :], (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=live)

    @triton.jit
    def _silu_mul_kernel(U, Y, stride_u, stride_y, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < n
        g = tl.load(U + row * stride_u + cols, mask=live, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + n + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=live)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] without a copy when its rows are evenly strided (else a contiguous copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --- what the layers call ---------------------------------------------------------------------------------------
def rms_norm_fusable(width: int) -> bool:
    """Whether the RMSNorm kernel takes rows of this width (one program holds a whole row)."""
    return width <= 65536


def rope_fusable(head_dim: int) -> bool:
    """Whether the rotary kernel takes this head size (an even one whose half is a power of two)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half > 0 and half & (half - 1) == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., D] with weight [D]."""
    if not fused_available(x) or not rms_norm_fusable(x.shape[-1]):
        return rms_norm_reference(x, weight, eps)
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), x2.shape[1], eps,
                                         BLOCK=triton.next_power_of_2(x2.shape[1]), num_warps=8)
    return y.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, H, hd] (any strides over B, S, H; contiguous hd) with cos, sin [B or 1, S,
    1, hd]. Returns a new contiguous tensor."""
    b, s, h, hd = x.shape
    if (not fused_available(x) or not rope_fusable(hd) or x.stride(-1) != 1
            or cos.shape[0] != b or cos.dtype != x.dtype):
        return rope_reference(x, cos, sin)
    y = torch.empty((b, s, h, hd), dtype=x.dtype, device=x.device)
    if b * s == 0:
        return y
    if x.stride(0) != s * x.stride(1):  # token rows must be evenly strided across the batch dimension
        x = x.contiguous()
    c, sn = cos.reshape(b * s, hd), sin.reshape(b * s, hd)
    if c.stride(-1) != 1 or sn.stride(0) != c.stride(0):
        c, sn = c.contiguous(), sn.contiguous()
    _rope_kernel[(b * s,)](x, c, sn, y, h, x.stride(1), x.stride(2), c.stride(0), y.stride(1), y.stride(2),
                           HALF=hd // 2, HEADS_PAD=triton.next_power_of_2(h), num_warps=4)
    return y


def silu_mul(u: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of u [..., 2I] = [gate | up] -> [..., I]."""
    if not fused_available(u):
        return silu_mul_reference(u)
    u2 = _rows(u)
    n = u2.shape[1] // 2
    y = torch.empty((u2.shape[0], n), dtype=u.dtype, device=u.device)
    if u2.shape[0]:
        block = 1024
        _silu_mul_kernel[(u2.shape[0], triton.cdiv(n, block))](u2, y, u2.stride(0), y.stride(0), n, BLOCK=block,
                                                               num_warps=4)
    return y.view(*u.shape[:-1], n)

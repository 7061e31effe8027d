"""Group-wise asymmetric min/max quantisation: `compress`, `compress_into`, `decompress`.

Each group of `group_size` contiguous elements along `group_dim` is mapped onto 2**bits evenly spaced
levels between its minimum and maximum:

    scale = (max - min) / (2**bits - 1)
    q     = round((x - min) / scale), clamped to [0, 2**bits - 1]
    x'    = min + q * scale

Error bound (finite inputs): |x - x'| <= (max - min) / (2**bits - 1) / 2 + eps for every element,
where eps covers floating-point rounding: a few units in the last place of the group's largest
magnitude in the output dtype, plus the rounding of scale/min when they are stored in a narrower
dtype than the source (`CompressionConfig.scale_dtype`). To keep that rounding from pushing the
group's extremes off the grid, the stored min is rounded down and the stored scale up, and values are
quantised against the stored pair. Values already on a group's grid (min + k * scale, with min and
scale exact in the storage dtype) round-trip exactly. A constant group (max == min) gets scale 0 and
decodes to its value exactly; nothing is divided by zero. A dimension that is not a multiple of
`group_size` pads its last group with copies of its last element, which leaves that group's min and
max unchanged; `decompress` drops the padding.

Inputs must be finite: a NaN or infinity spoils its whole group.
"""
from __future__ import annotations

import math

import torch

from flexserve.compression.config import CompressionConfig
from flexserve.compression.tensor import SUPPORTED_DTYPES, CompressedTensor


def compress(x: torch.Tensor, config: CompressionConfig) -> CompressedTensor:
    """Quantise `x` (fp32, fp16 or bf16, on any device) into a new `CompressedTensor` on x's device."""
    dest = CompressedTensor.empty(x.shape, x.dtype, config, device=x.device)
    compress_into(x, dest)
    return dest


def compress_into(x: torch.Tensor, dest: CompressedTensor) -> CompressedTensor:
    """Quantise `x` into `dest`'s preallocated buffers, which may be a view from `dest.narrow`.

    Used for the KV cache: allocate the whole cache once with `CompressedTensor.empty`, then write
    new tokens with `compress_into(new_kv, cache.narrow(token_dim, start, num_new))`. Returns `dest`.
    """
    if x.shape != dest.shape or x.dtype != dest.dtype:
        raise ValueError(f"cannot compress {x.dtype} {tuple(x.shape)} into a CompressedTensor of "
                         f"{dest.dtype} {tuple(dest.shape)}")
    if x.device != dest.device:
        raise ValueError(f"x is on {x.device} but dest is on {dest.device}")
    if x.numel() == 0:
        return dest
    config = dest.config
    xg = _to_groups(x, dest.group_dim, config.group_size)  # [*lead, G, group_size], x's dtype
    x_min, x_max = torch.aminmax(xg, dim=-1, keepdim=True)  # [*lead, G, 1], exact in any dtype
    scale = (x_max.float() - x_min.float()).div_(config.max_level)  # fp32
    scale_dtype = dest.scale.dtype
    stored_scale = _round_up(scale, scale_dtype)
    # the min is one of x's values, so it needs rounding only into a narrower dtype than x's
    stored_min = x_min if scale_dtype == x.dtype else _round_down(x_min.float(), scale_dtype)

    # Quantise against the stored (rounded) pair so decompress sees exactly this grid. A constant
    # group has scale 0 and x - min == 0: any positive divisor gives q = 0.
    divisor = stored_scale.float().clamp_min_(torch.finfo(torch.float32).tiny)
    q = torch.sub(xg, stored_min.float()).div_(divisor).round_().clamp_(0, config.max_level)  # fp32
    if config.num_bits == 8:
        dest.data.copy_(q)
    else:
        half = config.group_size // 2
        # byte j = q[j] | q[j + half] << 4; the sum is an exact integer in [0, 255]
        dest.data.copy_(torch.add(q[..., :half], q[..., half:], alpha=16))
    dest.scale.copy_(stored_scale)
    dest.min.copy_(stored_min)
    return dest


def decompress(c: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantised tensor, of `c.shape` and `c.dtype` on `c.device`, written into `out` if given.

    With the grouped dimension a multiple of `group_size` this writes `out` once, in one fused
    multiply-add; 4-bit first unpacks into a uint8 buffer of one byte per element. Fastest when
    `group_dim` is the last dimension, so every write is contiguous (about 3x faster than dim 0).
    """
    if out is None:
        out = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    elif out.shape != c.shape or out.dtype != c.dtype or out.device != c.device:
        raise ValueError(f"out must be {c.dtype} {tuple(c.shape)} on {c.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if out.numel() == 0:
        return out
    group_size = c.config.group_size
    dim_size = c.shape[c.group_dim]
    num_full = dim_size // group_size
    out_last = out.movedim(c.group_dim, -1)  # a view, [*lead, dim_size]
    if num_full == c.num_groups:
        _dequantize(c.data, c.scale, c.min, out_last.unflatten(-1, (num_full, group_size)), c.config)
        return out
    if num_full:
        _dequantize(c.data[..., :num_full, :], c.scale[..., :num_full, :], c.min[..., :num_full, :],
                    out_last[..., :num_full * group_size].unflatten(-1, (num_full, group_size)), c.config)
    # the padded last group goes through a small buffer, then loses its padding
    tail = out.new_empty((*out_last.shape[:-1], 1, group_size))  # [*lead, 1, group_size]
    _dequantize(c.data[..., num_full:, :], c.scale[..., num_full:, :], c.min[..., num_full:, :], tail,
                c.config)
    out_last[..., num_full * group_size:].copy_(tail[..., 0, :dim_size - num_full * group_size])
    return out


def _dequantize(data: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor, dst: torch.Tensor,
                config: CompressionConfig) -> None:
    """dst[..., g, :] = min[g] + q[g, :] * scale[g]; dst is a (possibly strided) [*lead, g, group_size] view."""
    if config.num_bits == 4:
        # unpack both nibbles into one uint8 buffer; addcmul then widens it on the fly, so the output
        # is written once
        levels = torch.empty(dst.shape, dtype=torch.uint8, device=dst.device)  # [*lead, g, group_size]
        halves = levels.unflatten(-1, (2, config.group_size // 2))  # [*lead, g, 2, group_size/2]
        torch.bitwise_and(data, 0x0F, out=halves[..., 0, :])
        torch.bitwise_right_shift(data, 4, out=halves[..., 1, :])
    else:
        levels = data
    torch.addcmul(min_, levels, scale, out=dst)  # min + q * scale, one fused pass


def _to_groups(x: torch.Tensor, group_dim: int, group_size: int) -> torch.Tensor:
    """x with `group_dim` moved last, padded to whole groups and split: [*lead, G, group_size]."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"compression supports {SUPPORTED_DTYPES}, got {x.dtype}")
    x_last = x.movedim(group_dim, -1)  # [*lead, n]
    size = x_last.shape[-1]
    num_groups = math.ceil(size / group_size)
    pad = num_groups * group_size - size
    if pad:
        # copies of the last element leave the last group's min and max unchanged
        x_last = torch.cat([x_last, x_last[..., -1:].expand(*x_last.shape[:-1], pad)], dim=-1)
    return x_last.reshape(*x_last.shape[:-1], num_groups, group_size)  # copies only if x_last is strided


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) in `dtype`, rounded towards +inf: exact values stay, others go at most one ulp up."""
    return _round_directed(x, dtype, torch.finfo(dtype).eps)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) in `dtype`, rounded towards -inf: exact values stay, others go at most one ulp down."""
    return _round_directed(x, dtype, -torch.finfo(dtype).eps)


def _round_directed(x: torch.Tensor, dtype: torch.dtype, step: float) -> torch.Tensor:
    if dtype == x.dtype:
        return x
    nearest = x.to(dtype)
    is_wrong_way = nearest.float() < x if step > 0 else nearest.float() > x
    # round-to-nearest moves a value by at most half an ulp (<= eps/2 relative), so nudging it by a
    # full relative eps first lands on the right side (normal numbers; subnormal scales are far below
    # any error that matters)
    return torch.where(is_wrong_way, x.add(x.abs(), alpha=step).to(dtype), nearest)

"""FP8 KV cache storage: keys and values kept as e4m3 and upcast where attention reads them.

The scale is one per tensor and fixed at 1.0 (as vLLM's default when no calibrated scales are given): K and V
of the supported families lie well inside e4m3's +-448, so e4m3's 3-bit mantissa (relative error <= 1/16) is
the whole loss, and a cache slice needs no scale bookkeeping when it is written, moved between tiers or read
by a kernel. Values outside the range saturate instead of becoming NaN.
"""
from __future__ import annotations

import torch

from .qweight import FP8_DTYPE, FP8_MAX


def kv_storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a KV cache is stored in: e4m3 for "fp8", else the model's `dtype` ("auto")."""
    return FP8_DTYPE if kv_cache_dtype == "fp8" else dtype


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: saturated and rounded to e4m3 for an fp8 cache, unchanged otherwise."""
    if cache_dtype != FP8_DTYPE:
        return x
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def from_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached keys or values in the compute `dtype` (an fp8 cache is upcast; others are returned as they are)."""
    return x.to(dtype) if is_fp8(x) else x


def write_slots(pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """pool[slots] = x along dim 0 (a paged pool's new tokens); an fp8 pool is written through its bytes,
    since the CPU has no index_copy for e4m3."""
    if is_fp8(pool):
        pool.view(torch.uint8).index_copy_(0, slots, to_cache(x, FP8_DTYPE).view(torch.uint8))
    else:
        pool.index_copy_(0, slots, x)

"""Page-locked host memory for the large, long-lived buffers: offloaded weights and host KV pools.

Why not `torch.empty(..., pin_memory=True)` for those: PyTorch's caching host allocator rounds every request
up to a power of two (a 168 MB fused QKV weight takes 256 MB) and pins with one `cudaHostAlloc` that faults
and locks every page on one thread. For a 70B model streamed from host memory that is ~164 GB pinned for
141 GB of weights, and minutes of start-up. Here a large buffer is ordinary host memory whose pages are
first touched by all intra-op threads (`zero_`), then registered with `cudaHostRegister`, exactly sized; the
registration is dropped when the buffer is garbage-collected. Small buffers, and any failure to register,
use the caching allocator as before; without CUDA nothing is pinned.
"""
from __future__ import annotations

import weakref

import torch

REGISTER_MIN_BYTES = 64 << 20  # below this the caching allocator's rounding costs little
_PAGE = 4096


def _register(ptr: int, size: int) -> bool:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0)) == 0


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the process is going away anyway
        pass


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool = True,
                 min_register_bytes: int = REGISTER_MIN_BYTES) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when `pin` (and CUDA is available)."""
    numel = 1
    for s in shape:
        numel *= s
    size = numel * torch.empty((), dtype=dtype).element_size()
    if not pin or not torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype)
    if size < min_register_bytes:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    raw = torch.empty(size + _PAGE, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % _PAGE  # register whole pages only
    body = raw[offset:offset + size]
    body.zero_()  # fault the pages in on every intra-op thread; registering then only locks them
    if not _register(body.data_ptr(), size):
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(raw, _unregister, body.data_ptr())
    out = body.view(dtype).view(shape)
    out._pinned_owner = raw  # the registration lives as long as some tensor on the Python side refers to it
    return out

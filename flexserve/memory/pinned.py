"""Page-locked host memory for the large, long-lived buffers: offloaded weights and host KV pools.

Why not `torch.empty(..., pin_memory=True)` for those: PyTorch's caching host allocator rounds every request
up to a power of two (a 168 MB fused QKV weight takes 256 MB) and pins with one `cudaHostAlloc` that faults
and locks every page on one thread. For a 70B model streamed from host memory that is ~164 GB pinned for
141 GB of weights, and minutes of start-up. Here a large buffer is an anonymous memory map (page-aligned,
whole pages, never shared with another allocation) whose pages are first touched by all intra-op threads
(`zero_`), then registered with `cudaHostRegister`, exactly sized. The map is the memory's owner: every
tensor or view of it keeps it alive, and the registration is dropped only when the last one is gone. Small
buffers, and any failure to register, use the caching allocator as before; without CUDA nothing is pinned.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import warnings
import weakref

import numpy as np
import torch

REGISTER_MIN_BYTES = 64 << 20  # below this the caching allocator's rounding costs little


def _register(ptr: int, size: int, device: torch.device | None) -> bool:
    # cudaHostRegister works through the calling thread's current device: name ours, so that a process
    # serving on cuda:1 does not open a context on cuda:0 for it.
    ctx = torch.cuda.device(device) if device is not None and device.index is not None else contextlib.nullcontext()
    with ctx:
        ok = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0)) == 0
    if not ok:
        _clear_cuda_error()
    return ok


def _clear_cuda_error() -> None:
    """A failed runtime call leaves its error for the thread's next `cudaGetLastError`, which PyTorch reads
    after its next kernel launch and would report there; read it now (best effort: the runtime library is the
    one torch loaded)."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).cudaGetLastError()
            return


def _unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(ptr)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool = True, zeroed: bool = False,
                 device: torch.device | None = None, min_register_bytes: int = REGISTER_MIN_BYTES) -> torch.Tensor:
    """A host tensor, page-locked when `pin` (and CUDA is available) for copies to `device`; zero-filled when
    `zeroed` (large buffers always are: their pages are touched before registering)."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    make = torch.zeros if zeroed else torch.empty
    if not pin or not torch.cuda.is_available():
        return make(shape, dtype=dtype)
    if size < min_register_bytes or size == 0:
        return make(shape, dtype=dtype, pin_memory=True)
    owner = mmap.mmap(-1, size)
    with warnings.catch_warnings():  # frombuffer warns that the buffer is writable: it is meant to be
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(owner, dtype=torch.uint8)
    raw.zero_()  # fault the pages in on every intra-op thread; registering then only locks them
    if not _register(raw.data_ptr(), size, device):
        del raw
        owner.close()
        return make(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(owner, _unregister, raw.data_ptr()).atexit = False
    return raw.view(dtype).view(shape)


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host array (a list, a numpy array) as a tensor on `device`, without making the host wait.

    A copy from pageable memory is staged by the driver, which waits for the stream to reach the copy: the
    host would stall behind every kernel already queued (the step in flight, for a serving engine that plans
    the next step meanwhile). From page-locked memory the copy is a plain DMA in stream order; the caching
    host allocator keeps the page-locked block until that copy has run."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


ALIGN_BYTES = 16  # the alignment Triton specialises a pointer argument on


def upload_parts(parts, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Several small host arrays as tensors on `device` through one `upload`, each starting on a 16-byte
    boundary of the shared buffer.

    Triton compiles a kernel variant per pattern of "pointer aligned to 16 bytes" over its pointer arguments;
    parts packed end to end would start at offsets that change with the batch, and a step meeting a new pattern
    would stall on a compilation in the middle of serving."""
    arrays = [np.asarray(p).ravel() for p in parts]
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    step = max(1, ALIGN_BYTES // np_dtype.itemsize)
    sizes = [a.size for a in arrays]
    padded = [-(-n // step) * step for n in sizes]
    packed = np.zeros(sum(padded), dtype=np_dtype)
    at = 0
    for a, n, width in zip(arrays, sizes, padded):
        packed[at:at + n] = a
        at += width
    whole = upload(packed, dtype, device)
    out, at = [], 0
    for n, width in zip(sizes, padded):
        out.append(whole[at:at + n])
        at += width
    return out

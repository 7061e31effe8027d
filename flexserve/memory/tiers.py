"""Memory tiers and the one copy path between them.

Three tiers: GPU (the compute device's own memory), CPU (pinned host memory, allocated once and reused) and
DISK (one file per tensor under the offload directory, read and written with positional I/O on the offload
executor's loader and storer threads, so disk traffic overlaps compute; reads go through the page cache).
A `Handle` says where one tensor lives; `Tiers.read_rows` copies rows of it into a buffer on the compute device
and `Tiers.write_rows` copies rows of such a buffer back into it. This module knows nothing of models. On a
machine without CUDA the compute device is the CPU: the "GPU" tier is then ordinary memory of the compute device
and the CPU and disk tiers stay real, so every path runs in CI.
"""
from __future__ import annotations

import atexit
import enum
import functools
import os
import shutil
import signal
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass

import torch

from ..errors import PolicyError
from .pinned import pinned_empty


# Host->device copies of weights are issued in pieces of at most this size. One DMA engine serves every
# stream's host->device copies in order, so a 400 MB weight copy on the load stream would hold back the small
# latency-critical copy on the compute stream behind it (CPU attention's output, ~0.2 MB) for ~8 ms; in 16 MiB
# pieces it waits at most ~0.3 ms. Issuing a piece costs the host ~10 us.
COPY_CHUNK_BYTES = 16 << 20


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


def tier_by_fraction(mid_percent: float, gpu_percent: float, cpu_percent: float) -> Tier:
    """FlexGen's rule: an object whose middle falls in the first gpu% goes to the GPU, the next cpu% to the CPU."""
    if mid_percent < gpu_percent:
        return Tier.GPU
    if mid_percent < gpu_percent + cpu_percent:
        return Tier.CPU
    return Tier.DISK


def slot_tier(k: int, n: int, gpu_percent: float, cpu_percent: float) -> Tier:
    """The tier of slot `k` of `n` equal slots by the midpoint rule: how the cache ((layer, GPU batch) slots)
    and the activations (GPU-batch slots) are placed, and what the planner counts for them."""
    return tier_by_fraction((k + 0.5) / n * 100, gpu_percent, cpu_percent)


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _raw_view(t: torch.Tensor):
    """Numpy uint8 view of a contiguous CPU tensor (works for bf16, which numpy lacks)."""
    return t.view(torch.uint8).reshape(-1).numpy() if t.numel() else t.view(torch.uint8).numpy()


class DiskTier:
    """Tensors stored as raw files in a private directory; removed on close, at exit and when SIGINT or SIGTERM
    ends the process (an ignored signal, or a handler that lets the process go on, leaves them)."""

    _live: "weakref.WeakSet[DiskTier]" = weakref.WeakSet()
    _hooks_installed = False

    def __init__(self, offload_dir: str):
        if not offload_dir:
            raise PolicyError("the policy puts data on disk but no offload_dir was given")
        try:
            os.makedirs(offload_dir, exist_ok=True)
            self.root = tempfile.mkdtemp(prefix="flexserve-", dir=offload_dir)
        except OSError as e:
            raise PolicyError(f"cannot use offload_dir {offload_dir!r}: {e}") from None
        self._lock = threading.Lock()
        DiskTier._live.add(self)
        DiskTier._install_hooks()

    @classmethod
    def _install_hooks(cls) -> None:
        if cls._hooks_installed:
            return
        cls._hooks_installed = True
        atexit.register(cls._close_all)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(sig)
                # An ignored signal stays ignored (the process goes on and still uses its files), and a handler
                # installed outside Python (None) cannot be chained: both are left as they are.
                if previous is signal.SIG_IGN or previous is None:
                    continue
                signal.signal(sig, functools.partial(cls._on_signal, previous))

    @classmethod
    def _on_signal(cls, previous, signum, frame) -> None:
        """The files go only when the signal ends the process. The default action (SIG_DFL) ends it without
        exit handlers: remove them, then die of the same signal. A Python handler runs first; if it returns,
        the process carries on (a graceful drain, say) and keeps its files; if it raises (KeyboardInterrupt,
        SystemExit), they are removed before the exception goes on."""
        if previous is signal.SIG_DFL:
            cls._close_all()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        try:
            previous(signum, frame)
        except BaseException:
            cls._close_all()
            raise

    @classmethod
    def _close_all(cls) -> None:
        for t in list(cls._live):
            t.close()

    def new_path(self, name: str) -> str:
        return os.path.join(self.root, f"{name}-{uuid.uuid4().hex[:8]}.bin")

    def write(self, path: str, src: torch.Tensor, offset_bytes: int = 0) -> None:
        """Write a contiguous CPU tensor at a byte offset (creating the file if needed)."""
        data = _raw_view(src.contiguous())
        flags = os.O_WRONLY | os.O_CREAT
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset_bytes + done)
        finally:
            os.close(fd)

    def read_into(self, path: str, dst: torch.Tensor, offset_bytes: int = 0) -> None:
        """Fill a contiguous CPU tensor (ideally pinned) from a file."""
        view = memoryview(_raw_view(dst))
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset_bytes + done)
                if n <= 0:
                    raise OSError(f"short read from {path}")
                done += n
        finally:
            os.close(fd)

    def close(self) -> None:
        if getattr(self, "root", None) and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)
        DiskTier._live.discard(self)


@dataclass
class Handle:
    """Where one tensor lives: a tensor on the GPU or CPU tier, or a file on the disk tier."""

    tier: Tier
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: torch.Tensor | None = None  # GPU and CPU tiers
    path: str | None = None  # DISK tier

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


class Tiers:
    """The three tiers of one executor: allocation on each, and copies between them."""

    def __init__(self, device: torch.device, offload_dir: str | None = None, pin: bool = True):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.pin = pin and self.is_cuda
        self._offload_dir = offload_dir
        self._disk: DiskTier | None = None

    @property
    def disk(self) -> DiskTier:
        if self._disk is None:
            self._disk = DiskTier(self._offload_dir or "")
        return self._disk

    def empty_cpu(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return pinned_empty(shape, dtype, pin=self.pin, device=self.device)

    def allocate(self, tier: Tier, shape: tuple[int, ...], dtype: torch.dtype, name: str = "t") -> Handle:
        """Uninitialised storage on a tier (disk files are created sparse)."""
        if tier is Tier.GPU:
            return Handle(tier, shape, dtype, data=torch.empty(shape, dtype=dtype, device=self.device))
        if tier is Tier.CPU:
            return Handle(tier, shape, dtype, data=self.empty_cpu(shape, dtype))
        path = self.disk.new_path(name)
        with open(path, "wb") as f:
            f.truncate(nbytes(shape, dtype))
        return Handle(tier, shape, dtype, path=path)

    def store(self, tier: Tier, src: torch.Tensor, name: str = "t") -> Handle:
        """Place a tensor on a tier, copying it there."""
        h = self.allocate(tier, tuple(src.shape), src.dtype, name)
        if h.data is not None:
            h.data.copy_(src)
        else:
            self.disk.write(h.path, src.detach().to("cpu"))
        return h

    def row_bytes(self, h: Handle) -> int:
        return nbytes(h.shape[1:], h.dtype)

    def read_rows(self, h: Handle, dst: torch.Tensor, lo: int, hi: int, staging: torch.Tensor | None = None,
                  non_blocking: bool = True, dim: int = 0) -> None:
        """Copy rows [lo, hi) of dim 0 of a stored tensor into `dst[lo:hi]` (dst on the compute device).

        Disk rows go through `staging` (pinned, at least as large as the stored tensor): a positional read into
        host memory, then one copy to the device.
        """
        if hi <= lo:
            return
        if h.data is not None:
            step = hi - lo
            if self.is_cuda and non_blocking and dim == 0:
                step = max(1, COPY_CHUNK_BYTES // max(1, self.row_bytes(h)))
            for a in range(lo, hi, step):  # chunks: see COPY_CHUNK_BYTES
                b = min(hi, a + step)
                dst.narrow(dim, a, b - a).copy_(h.data.narrow(dim, a, b - a), non_blocking=non_blocking)
            return
        assert dim == 0, "disk tensors are read along dim 0"
        buf = staging[lo:hi] if staging is not None else self.empty_cpu((hi - lo, *h.shape[1:]), h.dtype)
        self.disk.read_into(h.path, buf, lo * self.row_bytes(h))
        dst[lo:hi].copy_(buf, non_blocking=non_blocking and staging is not None)

    def write_rows(self, h: Handle, src: torch.Tensor, lo: int, hi: int, staging: torch.Tensor | None = None,
                   non_blocking: bool = True, dim: int = 0) -> None:
        """Copy `src[lo:hi]` (on the compute device) into rows [lo, hi) of a stored tensor.

        To disk this is a device-to-host copy into `staging` that must finish before the positional write, so
        it synchronises the current stream: callers run it on the store lane, off the compute path.
        """
        if hi <= lo:
            return
        if h.data is not None:
            region, part = h.data.narrow(dim, lo, hi - lo), src.narrow(dim, lo, hi - lo)
            if src.is_cuda and staging is not None and not region.is_contiguous():
                # A strided host region would make the copy go through pageable memory: stage it contiguous
                # in pinned memory, then scatter on the host (this runs on the store thread, off the GPU's path).
                buf = staging.reshape(-1)[:region.numel()].view(region.shape)
                buf.copy_(part, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                region.copy_(buf)
            else:
                region.copy_(part, non_blocking=non_blocking)
            return
        assert dim == 0, "disk tensors are written along dim 0"
        buf = staging[lo:hi] if staging is not None else self.empty_cpu((hi - lo, *h.shape[1:]), h.dtype)
        buf.copy_(src[lo:hi], non_blocking=self.is_cuda)
        if self.is_cuda:
            torch.cuda.current_stream().synchronize()
        self.disk.write(h.path, buf, lo * self.row_bytes(h))

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None

"""`calibrate`: measure this machine into a `Hardware` profile with plain PyTorch.

Each figure is timed the way the executor uses the resource: large host↔device copies from pinned and pageable
memory, disk writes made durable (fsync) and read back past the page cache (O_DIRECT where the filesystem allows
it; the profile's notes say when it did not), square matmuls per dtype, a device copy for HBM bandwidth, a CPU
reduction for CPU read bandwidth (what CPU attention is bound by), and a tiny decoder layer for the fixed cost
per layer per batch. On a machine without CUDA the compute device is the CPU: its "GPU" figures are the CPU's
own, host↔device copies are memcpys, and the notes say so.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import torch

from ..errors import PolicyError
from .hardware import Hardware, profile

MIB = 1 << 20


class _Timer:
    """Times a callable on one device: warm up, then the fastest of three windows of `min_time / 3` each.

    The fastest window, not the mean, because a shared machine only ever makes things slower than they are.
    """

    def __init__(self, device: torch.device, min_time: float):
        self.device, self.min_time = device, min_time

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], max_iters: int = 10_000) -> float:
        fn()  # first call pays allocation and kernel selection
        self.sync()
        best = float("inf")
        for _ in range(3):
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                if n >= max_iters or time.perf_counter() - start >= self.min_time / 3:
                    break
            self.sync()
            best = min(best, (time.perf_counter() - start) / n)
        return best


def copy_bandwidths(dev: torch.device, nbytes: int = 512 * MIB, min_time: float = 0.3) -> dict[str, float]:
    """Host<->device copy bandwidths in bytes/s (pinned and pageable; memcpy on a CPU device)."""
    return _copy_bandwidths(dev, _Timer(dev, min_time), nbytes)


def _copy_bandwidths(dev: torch.device, timer: _Timer, nbytes: int) -> dict[str, float]:
    if dev.type != "cuda":  # host and device are one memory: a memcpy is what a "transfer" costs
        a, b = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        a.fill_(1)
        bw = nbytes / timer(lambda: b.copy_(a))
        return dict(h2d_pinned_bw=bw, d2h_pinned_bw=bw, h2d_pageable_bw=bw, d2h_pageable_bw=bw)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out = {}
    for kind, pin in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        out[f"h2d_{kind}_bw"] = nbytes / timer(lambda: gpu.copy_(host, non_blocking=pin))
        out[f"d2h_{kind}_bw"] = nbytes / timer(lambda: host.copy_(gpu, non_blocking=pin))
    return out


def _disk_bandwidths(folder: str, nbytes: int) -> tuple[dict[str, float], str]:
    """Write then read a temporary file; returns bandwidths and how they were measured."""
    chunk = 8 * MIB
    nbytes = max(chunk, nbytes // chunk * chunk)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(4096) * (chunk // 4096))
    fd_tmp, path = tempfile.mkstemp(prefix="flexserve-calibrate-", dir=folder)
    os.close(fd_tmp)
    direct = getattr(os, "O_DIRECT", 0)
    try:
        how = "O_DIRECT"
        try:
            fd = os.open(path, os.O_WRONLY | direct)
            os.write(fd, buf)  # probe: some filesystems (tmpfs) refuse O_DIRECT
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            how = "buffered + fsync, page cache dropped with posix_fadvise (may be optimistic)"
            fd = os.open(path, os.O_WRONLY)
        start = time.perf_counter()
        for _ in range(nbytes // chunk):
            os.write(fd, buf)
        os.fsync(fd)
        write_bw = nbytes / (time.perf_counter() - start)
        os.close(fd)
        flags = os.O_RDONLY | (direct if how == "O_DIRECT" else 0)
        fd = os.open(path, flags)
        if how != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        read_bw = nbytes / (time.perf_counter() - start)
        os.close(fd)
    finally:
        buf.close()
        os.unlink(path)
    return dict(disk_read_bw=read_bw, disk_write_bw=write_bw), how


def _matmul_flops(dev: torch.device, dtype: torch.dtype, timer: _Timer, quick: bool) -> float:
    if dev.type == "cuda":
        n = 4096 if quick else 8192
    else:  # size the CPU problem so one product takes ~50 ms: slow dtypes (fp16 without AVX512-FP16) stay cheap
        probe = torch.randn(256, 256).to(dtype)
        t = timer(lambda: probe @ probe, max_iters=2)
        n = int(min(2048 if quick else 4096, max(256, 256 * (0.05 / max(t, 1e-9)) ** (1 / 3))))
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    return 2.0 * n ** 3 / timer(lambda: a @ b, max_iters=200)


def _mem_bandwidths(dev: torch.device, timer: _Timer, nbytes: int) -> dict[str, float]:
    host = torch.ones(nbytes // 4, dtype=torch.float32)
    cpu_read = nbytes / timer(lambda: host.sum())  # CPU attention streams the cache: reads, not copies
    if dev.type != "cuda":
        return dict(gpu_mem_bw=cpu_read, cpu_mem_bw=cpu_read)
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return dict(gpu_mem_bw=2 * nbytes / timer(lambda: b.copy_(a)), cpu_mem_bw=cpu_read)


def _layer_overhead(dev: torch.device, timer: _Timer) -> float:
    """Seconds for one tiny decoder layer on one token: the launch and Python cost no bandwidth hides."""
    d, dtype = 64, torch.float16 if dev.type == "cuda" else torch.float32
    w = {k: torch.randn(*s, device=dev, dtype=dtype) * 0.02 for k, s in
         (("qkv", (3 * d, d)), ("o", (d, d)), ("up", (4 * d, d)), ("down", (d, 4 * d)), ("norm", (d,)))}
    x = torch.randn(1, 1, d, device=dev, dtype=dtype)
    f = torch.nn.functional

    def layer() -> torch.Tensor:
        h = f.layer_norm(x, (d,), w["norm"], w["norm"])
        q, k, v = f.linear(h, w["qkv"]).view(1, 1, 3, 4, d // 4).unbind(2)
        a = f.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = x + f.linear(a.transpose(1, 2).reshape(1, 1, d), w["o"])
        m = f.layer_norm(h, (d,), w["norm"], w["norm"])
        return h + f.linear(f.relu(f.linear(m, w["up"])), w["down"])

    with torch.inference_mode():
        return timer(layer)


def executor_constants(device_type: str) -> dict[str, float]:
    """What calibrate cannot measure alone: properties of the executor's schedule, fitted to measured GPU runs
    (planner/hardware.py says how). Left at their ideal defaults, a calibrated plan would count CPU attention
    as hidden behind the weight stream and nothing as unoverlapped. A CPU-only machine has no copies for
    anything to overlap or wait on, and keeps the defaults."""
    if device_type != "cuda":
        return {}
    fitted = profile("h100")
    return {"layer_sync_s": fitted.layer_sync_s, "cpu_attention_overlap": fitted.cpu_attention_overlap}


def _sizes(dev: torch.device, folder: str) -> dict[str, float]:
    import psutil

    cpu = float(psutil.virtual_memory().available)
    gpu = float(torch.cuda.mem_get_info(dev)[1]) if dev.type == "cuda" else cpu
    return dict(gpu_mem=gpu, cpu_mem=cpu, disk=float(shutil.disk_usage(folder).free))


def calibrate(device: str | torch.device | None = None, quick: bool = False, progress: bool = True,
              disk_dir: str | None = None) -> Hardware:
    """Measure this machine (a few seconds with `quick`, under a minute without) and return its profile.

    `disk_dir` is where the disk tier will live (the offload dir); by default the system temp dir.
    """
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PolicyError("calibrate: CUDA was asked for but is not available")
    folder = disk_dir or tempfile.gettempdir()
    if not os.path.isdir(folder):
        raise PolicyError(f"calibrate: disk folder {folder!r} does not exist")
    timer = _Timer(dev, 0.2 if quick else 1.0)
    copy_bytes = (64 if quick else 512) * MIB
    values: dict[str, float] = {}
    notes: list[str] = []

    def sizes() -> None:
        values.update(_sizes(dev, folder))

    def copies() -> None:
        values.update(_copy_bandwidths(dev, timer, copy_bytes))

    def disk() -> None:
        bws, how = _disk_bandwidths(folder, (64 if quick else 1024) * MIB)
        values.update(bws)
        notes.append(f"disk ({folder}): {how}")

    def matmuls() -> None:
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            values[f"gpu_flops_{name}"] = _matmul_flops(dev, dtype, timer, quick)

    def memory() -> None:
        values.update(_mem_bandwidths(dev, timer, (256 if quick else 2048) * MIB))

    def cpu_flops() -> None:
        cpu_timer = _Timer(torch.device("cpu"), timer.min_time)
        values["cpu_flops"] = (values["gpu_flops_fp32"] if dev.type != "cuda"
                               else _matmul_flops(torch.device("cpu"), torch.float32, cpu_timer, quick))

    def overhead() -> None:
        values["layer_overhead_s"] = _layer_overhead(dev, timer)
        values.update(executor_constants(dev.type))

    def cpu_attention() -> None:
        cpu_timer = _Timer(torch.device("cpu"), timer.min_time)
        rates = cpu_attention_rates(cpu_timer, quick)
        values["cpu_attention_bw"] = rates["float16" if dev.type == "cuda" else "float32"]
        values["cpu_attention_bw_bf16"], values["cpu_attention_bw_fp32"] = rates["bfloat16"], rates["float32"]
        if dev.type == "cuda":  # the weight stream while CPU attention runs beside it
            values["h2d_contended_bw"] = _h2d_beside_cpu_attention(dev, cpu_timer, copy_bytes, quick)

    def dequant() -> None:
        values["dequant_bw"] = _dequant_bw(dev, timer, quick)

    steps = (("memory sizes", sizes), ("host<->device copies", copies), ("disk write/read", disk),
             ("matmul FLOP/s per dtype", matmuls), ("memory bandwidth", memory), ("CPU FLOP/s", cpu_flops),
             ("per-layer overhead", overhead), ("CPU attention", cpu_attention), ("4-bit weight rebuild", dequant))
    with _progress(progress) as bar:
        task = bar.add_task("calibrating", total=len(steps)) if bar is not None else None
        for label, step in steps:
            if bar is not None:
                bar.update(task, description=f"calibrating: {label}")
            step()
            if bar is not None:
                bar.advance(task)
    if dev.type != "cuda":
        notes.append("no CUDA: 'gpu' figures are the CPU's own and host<->device copies are memcpys; "
                     "gpu_mem and cpu_mem are the same RAM")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    notes.append(f"measured {time.strftime('%Y-%m-%d')} with torch {torch.__version__}"
                 + (" (quick)" if quick else ""))
    return Hardware(name=f"calibrated ({name})", notes="; ".join(notes), unified_memory=dev.type != "cuda",
                    **values)


def _cpu_attention_bw(dtype: torch.dtype, timer: "_Timer", quick: bool) -> float:
    """Cache bytes per second read by a decode-step attention on the CPU (head-major cache, as the executor
    keeps it), in the dtype the runtime uses there: half precision next to a GPU, fp32 on a CPU-only box."""
    import torch.nn.functional as F

    b, h, length, d = (4, 8, 512, 128) if quick else (16, 32, 1024, 128)
    q = torch.randn(b, h, 1, d, dtype=dtype)
    k = torch.randn(b, h, length, d, dtype=dtype)
    v = torch.randn(b, h, length, d, dtype=dtype)
    seconds = timer(lambda: F.scaled_dot_product_attention(q, k, v))
    return 2 * k.numel() * k.element_size() / seconds


# (batch, context) of the decode steps a CPU-attention policy runs: a block of tens of sequences at the
# prompt lengths plans use; the profile keeps the rate at the largest (the throughput-oriented policies').
CPU_ATTENTION_SHAPES = ((8, 512), (32, 1024), (64, 2048))


def cpu_attention_rates(timer: "_Timer", quick: bool,
                        dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")) -> dict[str, float]:
    """Cache bytes/s read by decode attention on the CPU per host-cache dtype, at policy shapes (`quick`: the
    smallest only): the rate at the largest shape measured."""
    import torch.nn.functional as F

    shapes = CPU_ATTENTION_SHAPES[:1] if quick else CPU_ATTENTION_SHAPES
    heads, dim = 32, 128
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        for b, length in shapes:
            q = torch.randn(b, heads, 1, dim, dtype=dtype)
            k = torch.randn(b, heads, length, dim, dtype=dtype)
            v = torch.randn(b, heads, length, dim, dtype=dtype)
            seconds = timer(lambda: F.scaled_dot_product_attention(q, k, v), max_iters=50)
            out[name] = 2 * k.numel() * k.element_size() / seconds
    return out


def _h2d_beside_cpu_attention(dev: torch.device, cpu_timer: "_Timer", nbytes: int, quick: bool) -> float:
    """Pinned host-to-GPU bytes/s while another thread runs CPU attention (both read host memory)."""
    import threading

    import torch.nn.functional as F

    b, length = CPU_ATTENTION_SHAPES[0 if quick else 1]
    q, k, v = (torch.randn(b, 32, n, 128, dtype=torch.float16) for n in (1, length, length))
    stop = threading.Event()

    def attend() -> None:
        while not stop.is_set():
            F.scaled_dot_product_attention(q, k, v)

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    worker = threading.Thread(target=attend, daemon=True)
    worker.start()
    try:
        seconds = _Timer(dev, cpu_timer.min_time)(lambda: dst.copy_(src, non_blocking=True))
    finally:
        stop.set()
        worker.join()
    return nbytes / seconds


def _dequant_bw(dev: torch.device, timer: "_Timer", quick: bool) -> float:
    """Half-precision bytes per second rebuilt from 4-bit group-quantised weights by the executor's own
    kernel (`--compress-weight`), on a weight matrix of a mid-size model."""
    from ..compression import CompressionConfig, compress, decompress

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    rows, cols = (1024, 4096) if quick else (4096, 16384)
    packed = compress(torch.randn(rows, cols, device=dev, dtype=dtype), CompressionConfig(num_bits=4, group_size=64))
    out = torch.empty(rows, cols, device=dev, dtype=dtype)
    return out.numel() * out.element_size() / timer(lambda: decompress(packed, out))


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True)

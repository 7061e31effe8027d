"""`Hardware`: the measured constants the cost model reads, built-in profiles, and sizes written by people.

A profile is plain data (bytes, bytes/s, FLOP/s, seconds) so that it can be measured on one machine by
`flexserve calibrate`, saved as JSON in the user's cache dir, and written by hand to plan for a machine one does
not have (a T4 box from a laptop). Every bandwidth is what a copy of a large buffer achieves, not a datasheet
peak, because the planner's predictions are only as good as these numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError

GB = 1e9
GIB = 1 << 30

_DTYPE_FLOPS_FIELD = {
    "float16": "gpu_flops_fp16", "fp16": "gpu_flops_fp16", "half": "gpu_flops_fp16",
    "bfloat16": "gpu_flops_bf16", "bf16": "gpu_flops_bf16",
    "float32": "gpu_flops_fp32", "fp32": "gpu_flops_fp32", "float": "gpu_flops_fp32",
}


@dataclass(frozen=True)
class Hardware:
    """One machine as the cost model sees it: tier sizes, link bandwidths, compute rates, fixed overheads.

    Sizes are bytes, bandwidths bytes/s, compute FLOP/s, overheads seconds. `gpu_*` fields describe the compute
    device; on a machine without CUDA that is the CPU itself and `notes` says so.
    """

    name: str
    gpu_mem: float
    cpu_mem: float
    disk: float
    h2d_pinned_bw: float
    d2h_pinned_bw: float
    h2d_pageable_bw: float
    d2h_pageable_bw: float
    disk_read_bw: float
    disk_write_bw: float
    gpu_flops_fp16: float
    gpu_flops_bf16: float
    gpu_flops_fp32: float
    gpu_mem_bw: float
    cpu_flops: float
    cpu_mem_bw: float
    layer_overhead_s: float
    notes: str = ""
    # Cache bytes per second that CPU attention reads in the runtime's half-precision dtype; 0 means
    # `cpu_mem_bw`. CPU kernels fall well short of memory bandwidth in fp16 (no native fp16 math on x86).
    cpu_attention_bw: float = 0.0
    # GPU-to-GPU link of tensor/pipeline parallelism (NVLink within a node): bytes/s per rank and the fixed cost
    # of one collective. 0 = unknown (a parallel estimate then needs it given explicitly).
    gpu_link_bw: float = 0.0
    gpu_link_latency_s: float = 0.0
    # Fraction of CPU-attention time during which the weight stream to the GPU keeps flowing: 1 = fully
    # overlapped (the ideal schedule), 0 = the two add up. A property of the executor on this machine, fitted
    # from a measured run (the h100 profile's value and how it was fitted: bench/RESULTS.md section 2).
    cpu_attention_overlap: float = 1.0
    # Bytes per second of half-precision weights the compute device rebuilds from 4-bit group-quantised ones
    # (`--compress-weight`): unpacking, scaling and writing the full tensor. 0 = bound by `gpu_mem_bw` on the
    # bytes read and written, which the eager PyTorch kernels fall far short of (bench/RESULTS.md section 2).
    dequant_bw: float = 0.0
    # Fraction of `cpu_mem` a plan leaves to the operating system, the page cache and other processes. Without
    # it the planner filled a 128 GiB host to its last gigabyte and the run was killed (bench/RESULTS.md, 2).
    host_reserve: float = 0.10
    # CPU attention's cache read rate with a bf16 / fp32 host cache (`--cpu-attention-dtype`), measured at a
    # policy's batch and context shapes; 0 = `cpu_attention_bw` (the half-precision rate).
    cpu_attention_bw_bf16: float = 0.0
    cpu_attention_bw_fp32: float = 0.0
    # Pinned host-to-GPU bytes/s while CPU attention runs beside the copy (both load the host's memory);
    # 0 = `h2d_pinned_bw`, no contention.
    h2d_contended_bw: float = 0.0
    # Seconds per decoder layer and GPU batch that no lane overlaps, resident layers included: the executor's
    # own bookkeeping between layers and, for streamed ones, the wait between weights landing and kernels
    # starting and the copies' shortfall from the measured link rate. A property of the executor's schedule,
    # fitted to measured runs like `cpu_attention_overlap`; the host's issuing of each layer's kernels is
    # `layer_overhead_s` (planner/launches.py), which runs beside the copies.
    layer_sync_s: float = 0.0
    # The compute device's memory is the host's (a CPU-only machine, or a unified-memory one): the "GPU" and
    # "CPU" tiers are one pool, and a plan's bytes on both count against it once.
    unified_memory: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.unified_memory, bool):
            raise PolicyError(f"hardware profile {self.name!r}: unified_memory must be true or false, "
                              f"got {self.unified_memory!r}")
        for f in dataclasses.fields(self):
            if f.name in ("name", "notes", "unified_memory"):
                continue
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise PolicyError(f"hardware profile {self.name!r}: {f.name} must be a finite number, got {v!r}")
            if f.name in ("cpu_attention_overlap", "host_reserve"):
                top = 1 if f.name == "cpu_attention_overlap" else 0.99  # a reserve of 100% leaves nothing
                if not 0 <= v <= top:
                    raise PolicyError(f"hardware profile {self.name!r}: {f.name} must be in [0, {top}], got {v}")
            elif f.name in ("gpu_mem", "cpu_mem", "disk", "layer_overhead_s", "cpu_attention_bw", "gpu_link_bw",
                            "gpu_link_latency_s", "dequant_bw", "cpu_attention_bw_bf16", "cpu_attention_bw_fp32",
                            "h2d_contended_bw", "layer_sync_s"):
                if v < 0:
                    raise PolicyError(f"hardware profile {self.name!r}: {f.name} must be >= 0, got {v}")
            elif v <= 0:
                raise PolicyError(f"hardware profile {self.name!r}: {f.name} must be > 0, got {v}")

    def gpu_flops(self, dtype: str) -> float:
        """Matmul FLOP/s of the compute device for a dtype name ("float16", "bf16", "float32", ...)."""
        key = _DTYPE_FLOPS_FIELD.get(dtype.lower().removeprefix("torch."))
        if key is None:
            raise PolicyError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
        return getattr(self, key)

    def cpu_attention_rate(self, cache_dtype: str | None = None) -> float:
        """Cache bytes/s CPU attention reads with a host cache of `cache_dtype` (None: half precision)."""
        key = (cache_dtype or "float16").lower().removeprefix("torch.")
        measured = {"bfloat16": self.cpu_attention_bw_bf16, "bf16": self.cpu_attention_bw_bf16,
                    "float32": self.cpu_attention_bw_fp32, "fp32": self.cpu_attention_bw_fp32}.get(key, 0.0)
        return measured or self.cpu_attention_bw or self.cpu_mem_bw

    def with_memory(self, gpu_mem: float | str | None = None, cpu_mem: float | str | None = None,
                    disk: float | str | None = None) -> "Hardware":
        """The same machine with some tiers capped (bytes, or sizes as the `--gpu-mem 16GiB` flags write them)."""
        changes = {k: float(parse_size(v)) for k, v in (("gpu_mem", gpu_mem), ("cpu_mem", cpu_mem), ("disk", disk))
                   if v is not None}
        return dataclasses.replace(self, **changes)

    def limits(self) -> dict[str, float]:
        """Bytes a plan may use per tier: the sizes, less the host's reserve for everything else. With unified
        memory each of the two tiers may take the whole pool (`pool_limit`), but not both together."""
        cpu = self.cpu_mem * (1 - self.host_reserve)
        if self.unified_memory:
            pool = self.pool_limit()
            return {"gpu": pool, "cpu": pool, "disk": self.disk}
        return {"gpu": self.gpu_mem, "cpu": cpu, "disk": self.disk}

    def pool_limit(self) -> float | None:
        """Bytes the GPU and CPU tiers may use together when they are one memory (the smaller of the two caps,
        less the host's reserve), else None: each tier has its own."""
        if not self.unified_memory:
            return None
        return min(self.gpu_mem, self.cpu_mem) * (1 - self.host_reserve)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> "Hardware":
        """Build from a dict, accepting human sizes ("16GiB") for the three memory fields."""
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a hardware profile must be an object of fields")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PolicyError(f"{source}: unknown hardware fields {unknown}; known: {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name != "name"}
        missing = sorted(required - set(data))
        if missing:
            raise PolicyError(f"{source}: hardware profile lacks {missing}")
        values = dict(data)
        values.setdefault("name", os.path.splitext(os.path.basename(source))[0])
        for key in ("gpu_mem", "cpu_mem", "disk"):
            if isinstance(values[key], str):
                values[key] = parse_size(values[key])
        return cls(**values)


# --- built-in profiles ---------------------------------------------------------------------------------------
def _h100() -> Hardware:
    # REFERENCE.md, measured with plain PyTorch on the H100 machine; fp32 matmul and pageable d2h were not
    # measured there and are the usual figures (TF32 off; pageable about as slow both ways).
    return Hardware(
        name="h100", gpu_mem=80e9, cpu_mem=125 * GIB, disk=64e9,
        h2d_pinned_bw=53.1e9, d2h_pinned_bw=54.9e9, h2d_pageable_bw=7.1e9, d2h_pageable_bw=7.1e9,
        disk_read_bw=0.91e9, disk_write_bw=1.2e9,
        gpu_flops_fp16=785e12, gpu_flops_bf16=777e12, gpu_flops_fp32=51e12,
        gpu_mem_bw=2.95e12, cpu_flops=886e9, cpu_mem_bw=93e9, layer_overhead_s=230e-6, layer_sync_s=200e-6,
        cpu_attention_bw=37e9,
        gpu_link_bw=329e9, gpu_link_latency_s=15e-6, cpu_attention_overlap=0.9, dequant_bw=0.2e12,
        notes="REFERENCE.md figures (H100 80GB HBM3, PCIe Gen5, 16 cores); disk measured with O_DIRECT; "
              "layer overhead and sync, fp16 CPU-attention rate and its overlap with the weight stream fitted to "
              "flexserve's own H100 runs, the 4-bit weight rebuild rate to its OPT-175B runs "
              "(bench/RESULTS.md); "
              "GPU link: NCCL all-reduce bus bandwidth on the 2x H100 machine (device KINDS.md), typical latency",
    )


def _t4() -> Hardware:
    # FlexGen paper's box (GCP, T4 16 GB, 208 GB RAM, 1.5 TB SSD); realistic rather than datasheet rates.
    return Hardware(
        name="t4", gpu_mem=16e9, cpu_mem=208e9, disk=1.5e12,
        h2d_pinned_bw=12e9, d2h_pinned_bw=12e9, h2d_pageable_bw=3e9, d2h_pageable_bw=3e9,
        disk_read_bw=2e9, disk_write_bw=1.5e9,
        gpu_flops_fp16=40e12, gpu_flops_bf16=6e12, gpu_flops_fp32=6e12,
        gpu_mem_bw=300e9, cpu_flops=1e12, cpu_mem_bw=40e9, layer_overhead_s=100e-6,
        notes="T4-class box written by hand (FlexGen paper setting): 16 GB GPU, 208 GB CPU, 1.5 TB SSD",
    )


PROFILES = {"h100": _h100, "t4": _t4}


def profile(name: str) -> Hardware:
    """A built-in hardware profile by name."""
    key = name.lower()
    if key not in PROFILES:
        raise PolicyError(f"unknown hardware profile {name!r}; built-in: {', '.join(sorted(PROFILES))}, "
                          "or give a JSON/TOML file")
    return PROFILES[key]()


# --- saved profiles ------------------------------------------------------------------------------------------
def default_profile_path() -> str:
    """`$XDG_CACHE_HOME/flexserve/hardware.json`, or `~/.cache/flexserve/hardware.json`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flexserve", "hardware.json")


def save_hardware(hw: Hardware, path: str | None = None) -> str:
    """Write a profile as JSON (atomically, so a crash never leaves half a file); returns the path."""
    path = path or default_profile_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(hw.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_hardware(path: str | None = None) -> Hardware:
    """Read a profile from a JSON (or TOML) file; the default path when none is given."""
    path = path or default_profile_path()
    if not os.path.isfile(path):
        raise PolicyError(f"no hardware profile at {path}: run `flexserve calibrate` or write one by hand")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PolicyError(f"hardware profile {path} is not valid: {e}") from None
    return Hardware.from_dict(data, source=path)


def resolve_hardware(spec: str | Hardware | None) -> Hardware | None:
    """A profile from a built-in name, a file path or an object; None stays None (the caller decides)."""
    if spec is None or isinstance(spec, Hardware):
        return spec
    if spec.lower() in PROFILES:
        return profile(spec)
    if spec.lower() == "saved":
        return load_hardware()
    if os.path.exists(spec) or spec.endswith((".json", ".toml")):
        return load_hardware(spec)
    raise PolicyError(f"hardware {spec!r} is neither a built-in profile ({', '.join(sorted(PROFILES))}), "
                      "'saved', nor a profile file")


# --- human sizes ---------------------------------------------------------------------------------------------
_UNITS = {
    "": 1, "b": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "pb": 1e15,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes from "16GiB", "1.5TB", "200G", "512MB" or a plain number.

    "GB"/"TB" are decimal (as disk makers and the FlexGen paper write them), "GiB" and a bare "G" binary (as
    `free -g` and Docker read them). Negative, non-finite or unit-less nonsense raises `PolicyError`.
    """
    if isinstance(text, bool):
        raise PolicyError(f"size {text!r} is not a number of bytes")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise PolicyError(f"size {text!r} must be a finite number of bytes >= 0")
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise PolicyError(f"cannot read size {text!r}: write a number and a unit, e.g. 16GiB, 1.5TB, 200G")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise PolicyError(f"unknown size unit {m.group(2)!r} in {text!r}; use B, KB, MB, GB, TB (decimal), "
                          "KiB, MiB, GiB, TiB or K, M, G, T (binary)")
    value = number * _UNITS[unit]
    if not math.isfinite(value):
        raise PolicyError(f"size {text!r} is too large")
    return int(round(value))


def format_size(num_bytes: float) -> str:
    """Bytes as a short decimal string ("16.0 GB"), the unit the planner's reports use throughout."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"

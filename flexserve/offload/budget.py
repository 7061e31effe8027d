"""Will a policy fit? Bytes per tier for weights and KV cache, checked before anything is allocated.

A policy that cannot fit must fail at once with the numbers, not as an out-of-memory crash halfway through
loading a 60 GB model.
"""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from ..compression.config import compression_ratio, kv_ratio, layer_ratio, stored_bytes_with_layers_at
from ..config import ModelConfig
from ..errors import PolicyError
from ..memory.tiers import Tier
from .placement import layer_weight_shares
from .policy import Policy

GiB = 1 << 30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class TierBytes:
    gpu: int = 0
    cpu: int = 0
    disk: int = 0


def weight_bytes(cfg: ModelConfig, policy: Policy, dtype_bytes: int) -> TierBytes:
    """Weight bytes per tier; with compress_weight every tier holds the matrices packed (the planner's count)."""
    ratio = compression_ratio(policy.comp_num_bits, policy.comp_group_size, dtype_bytes) \
        if policy.compress_weight else 1.0
    total = stored_bytes_with_layers_at(cfg, dtype_bytes, ratio, layer_ratio(cfg, policy.quantization,
                                                                             policy.quant_group_size, dtype_bytes,
                                                                             ratio))
    share = layer_weight_shares(cfg, policy)  # whole tensors move: the shares the placement really makes
    return TierBytes(int(total * share[Tier.GPU]), int(total * share[Tier.CPU]), int(total * share[Tier.DISK]))


def cache_bytes(cfg: ModelConfig, policy: Policy, dtype_bytes: int, seq_len: int) -> TierBytes:
    total = cfg.kv_bytes_per_token(dtype_bytes) * seq_len * policy.block_size * kv_ratio(policy.kv_cache_dtype,
                                                                                         dtype_bytes)
    return TierBytes(int(total * policy.cache_gpu_percent / 100), int(total * policy.cache_cpu_percent / 100),
                     int(total * policy.cache_disk_percent / 100))


def available(device: torch.device) -> TierBytes:
    """Free bytes now: GPU (the compute device), host RAM (shared with the CPU tier on a CPU device)."""
    cpu = psutil.virtual_memory().available
    gpu = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else cpu
    return TierBytes(gpu, cpu, 0)


@dataclass(frozen=True)
class TierNeed:
    """One tier as `check_fits` counts it: what a policy needs there, what it may use, and of what."""

    tier: str  # "GPU" or "CPU"
    need: int
    cap: int
    weights: int
    cache: int

    @property
    def shortfall(self) -> int:
        return max(0, self.need - self.cap)


def tier_needs(cfg: ModelConfig, policy: Policy, dtype_bytes: int, seq_len: int, device: torch.device,
               gpu_limit: int | None = None, cpu_limit: int | None = None,
               weights_placed: bool = False) -> tuple[TierNeed, TierNeed]:
    """The GPU's and the CPU's need and cap for a policy, counted as `check_fits` decides (the planner calls
    this too, so that no policy it returns is refused here). On a CPU device one physical memory holds both
    tiers: each tier's need is the two together, against the smaller cap."""
    free = available(device)
    w, c = weight_bytes(cfg, policy, dtype_bytes), cache_bytes(cfg, policy, dtype_bytes, seq_len)
    need_gpu, need_cpu = w.gpu + c.gpu, w.cpu + c.cpu
    if device.type != "cuda":  # one physical memory holds both tiers
        need_gpu = need_cpu = need_gpu + need_cpu
    placed_gpu, placed_cpu = (w.gpu, w.cpu) if device.type == "cuda" else (w.gpu + w.cpu,) * 2
    if not weights_placed:
        placed_gpu = placed_cpu = 0
    have_gpu, have_cpu = free.gpu + placed_gpu, free.cpu + placed_cpu
    gpu_cap = min(have_gpu, gpu_limit) if gpu_limit else have_gpu
    cpu_cap = min(have_cpu, cpu_limit) if cpu_limit else have_cpu
    if device.type != "cuda":  # both caps bound the one memory
        gpu_cap = cpu_cap = min(gpu_cap, cpu_cap)
    return (TierNeed("GPU", int(need_gpu), int(gpu_cap), w.gpu, c.gpu),
            TierNeed("CPU", int(need_cpu), int(cpu_cap), w.cpu, c.cpu))


def check_fits(cfg: ModelConfig, policy: Policy, dtype_bytes: int, seq_len: int, device: torch.device,
               gpu_limit: int | None = None, cpu_limit: int | None = None, weights_placed: bool = False) -> None:
    """Raise PolicyError when the weights plus the block's cache exceed a tier's free (or capped) memory.

    `weights_placed`: the weights already sit in their tiers (a check before each block), so the memory they
    hold is no longer "free" but is still this process's to use: it is counted back, or a model whose
    weights fill most of host memory would be refused for needing them twice."""
    for t in tier_needs(cfg, policy, dtype_bytes, seq_len, device, gpu_limit, cpu_limit, weights_placed):
        if t.shortfall:
            raise PolicyError(
                f"the policy ({policy.percent_flags()}) needs {fmt_bytes(t.need)} on the {t.tier} "
                f"(weights {fmt_bytes(t.weights)} + KV cache {fmt_bytes(t.cache)} for {policy.block_size} "
                f"sequences of {seq_len} tokens) but only {fmt_bytes(t.cap)} is available; move weights or cache "
                f"to a lower tier, shrink the block, or try `flexserve plan`")

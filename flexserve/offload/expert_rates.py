"""Whether an expert off the GPU is copied in or computed on the CPU where it lives, and the rates that decide.

`copies_expert` weighs the two by three rates (`ExpertRates`). Their defaults describe a typical PCIe host, but
hosts differ by more than the margin the rule works with: on one H200 host a bf16 expert of Mixtral-8x7B took
8 ms on the CPU for one token and 6.4 ms to copy, the opposite of what the defaults predict. So an executor
measures them on its own machine the first time it meets an off-GPU expert (`measure_expert_rates`): the CPU
running that very expert for 1 token (the host-memory read rate) and for 256 (the CPU's FLOP/s, counting the
whole time as compute, so that the rule errs towards copying large batches), and a page-locked host-to-device
copy of up to 64 MiB. It costs a few expert runs, once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .policy import EXPERT_RULES

_COPY_PROBE_BYTES = 64 << 20  # enough for the copy engine's steady rate, small enough to pin in a blink
_WIDE = 256  # tokens of the second CPU timing: enough that the FLOPs, not the weight read, set its time


@dataclass(frozen=True)
class ExpertRates:
    """The rates `copies_expert` weighs. The defaults are a PCIe 4/5 host with pinned memory and a many-core
    CPU; an executor measures its own (`measure_expert_rates`)."""

    cpu_flops: float = 1.0e12  # CPU matmul FLOP/s in the model's dtype
    host_read_bytes: float = 100e9  # host memory bandwidth a CPU matmul reads weights at
    pcie_bytes: float = 25e9  # host-to-device copy bandwidth from pinned memory


def copies_expert(tokens: int, expert_params: int, dtype_bytes: float, rates: ExpertRates,
                  rule: str = "auto") -> bool:
    """Whether an expert off the GPU that `tokens` tokens are routed to is copied in (True) or computed on the
    CPU where it lives (False). Computing on the CPU costs its FLOPs (2 per parameter per token) at the CPU
    rate plus one read of the weights from host memory; copying costs the weights' bytes at the PCIe rate (the
    GPU's own compute is small next to either). A disk-resident expert is read from disk either way."""
    if rule not in EXPERT_RULES:
        raise ValueError(f"expert rule must be one of {EXPERT_RULES}, got {rule!r}")
    if rule != "auto":
        return rule == "copy"
    weight_bytes = expert_params * dtype_bytes
    cpu_s = 2.0 * tokens * expert_params / rates.cpu_flops + weight_bytes / rates.host_read_bytes
    copy_s = weight_bytes / rates.pcie_bytes
    return copy_s < cpu_s


def copy_threshold(expert_params: int, dtype_bytes: int, rates: ExpertRates) -> int:
    """The fewest routed tokens for which `copies_expert` copies (for reports and the planner)."""
    weight_bytes = expert_params * dtype_bytes
    spare = weight_bytes / rates.pcie_bytes - weight_bytes / rates.host_read_bytes
    return max(0, int(spare * rates.cpu_flops / (2.0 * expert_params)) + 1)


def _best_of(fn: Callable[[], object], sync: Callable[[], None], repeats: int = 3) -> float:
    """Fastest of a few timed runs (after one untimed run pays the first-use costs)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def measure_expert_rates(run_on_cpu: Callable[[int], object], expert_params: int, expert_bytes: int,
                         device: torch.device) -> ExpertRates:
    """The rule's rates on this machine. `run_on_cpu(n)` computes one host-resident expert for n tokens; the
    host read rate is its bytes over the 1-token time, the CPU FLOP/s the FLOPs of `_WIDE` tokens over their
    whole time (a lower bound); the copy rate a page-locked copy of up to `_COPY_PROBE_BYTES` to `device`."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one = _best_of(lambda: run_on_cpu(1), lambda: None)
    wide = _best_of(lambda: run_on_cpu(_WIDE), lambda: None, repeats=1)
    flops = 2.0 * _WIDE * expert_params / wide
    nbytes = max(1 << 20, min(expert_bytes, _COPY_PROBE_BYTES))
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy = _best_of(lambda: dst.copy_(src, non_blocking=True), sync)
    return ExpertRates(cpu_flops=flops, host_read_bytes=expert_bytes / one, pcie_bytes=nbytes / copy)

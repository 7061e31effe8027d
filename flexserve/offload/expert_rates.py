"""Whether an expert off the GPU is copied in or computed on the CPU where it lives, and the rates that decide.

The two sides use different resources, the copy engine and the CPU, and run at the same time (the streamer
queues a layer's copies before the CPU starts on its share). So the rule `auto` does not send each expert to
whichever side is faster for it alone, which at one token per expert would send them all to the CPU and leave
the link idle: `split_experts` divides a layer's off-GPU experts between the sides so that both finish as
nearly together as whole experts allow. A decode step that reaches two off-GPU experts in a layer computes one
on the CPU while the other crosses PCIe, about half the time of either side alone; a prefill's hundreds of
tokens per expert still go to the GPU, whose copy then beats the CPU's FLOPs.

`expert_seconds` weighs each side by three rates (`ExpertRates`). Their defaults describe a typical PCIe host,
but hosts differ by more than the margin the rule works with: on one H200 host a bf16 expert of Mixtral-8x7B
took 8 ms on the CPU for one token and 6.4 ms to copy, the opposite of what the defaults predict. So an
executor measures them on its own machine the first time it meets an off-GPU expert (`measure_expert_rates`):
the CPU running that very expert for 1 token (the host-memory read rate) and for 256 (the CPU's FLOP/s,
counting the whole time as compute, so that the rule errs towards copying large batches), and a page-locked
host-to-device copy of up to 64 MiB. It costs a few expert runs, once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

_COPY_PROBE_BYTES = 64 << 20  # enough for the copy engine's steady rate, small enough to pin in a blink
_WIDE = 256  # tokens of the second CPU timing: enough that the FLOPs, not the weight read, set its time


@dataclass(frozen=True)
class ExpertRates:
    """The rates `expert_seconds` weighs. The defaults are a PCIe 4/5 host with pinned memory and a many-core
    CPU; an executor measures its own (`measure_expert_rates`)."""

    cpu_flops: float = 1.0e12  # CPU matmul FLOP/s in the model's dtype
    host_read_bytes: float = 100e9  # host memory bandwidth a CPU matmul reads weights at
    pcie_bytes: float = 25e9  # host-to-device copy bandwidth from pinned memory


def expert_seconds(tokens: int, expert_params: int, dtype_bytes: float, rates: ExpertRates) -> tuple[float, float]:
    """(CPU seconds, copy seconds) of one off-GPU expert that `tokens` tokens are routed to. Computing on the
    CPU costs its FLOPs (2 per parameter per token) at the CPU rate plus one read of the weights from host
    memory; copying costs the weights' bytes at the PCIe rate (the GPU's own compute is small next to either).
    A disk-resident expert is read from disk either way, which neither side counts."""
    weight_bytes = expert_params * dtype_bytes
    return (2.0 * tokens * expert_params / rates.cpu_flops + weight_bytes / rates.host_read_bytes,
            weight_bytes / rates.pcie_bytes)


def split_experts(cpu_s: list[float], copy_s: list[float]) -> list[bool]:
    """Which of a layer's off-GPU experts to copy in (True), the rest computed on the CPU at the same time, so
    that the later of the two sides finishes first. The experts are ordered by what copying costs against the
    CPU (copy_s / cpu_s, lowest first: one already held in a slot costs no copy) and a prefix of that order is
    copied, the prefix whose max(copy time, CPU time of the rest) is least; that is the best split with at
    most one expert whose time is shared, and exact for a layer's handful of experts of equal size."""
    if len(cpu_s) != len(copy_s):
        raise ValueError("one CPU time and one copy time per expert")
    order = sorted(range(len(cpu_s)), key=lambda i: copy_s[i] / max(cpu_s[i], 1e-30))
    copy_t, cpu_t = 0.0, sum(cpu_s)
    best, best_t = 0, cpu_t
    for n, i in enumerate(order, 1):
        copy_t, cpu_t = copy_t + copy_s[i], cpu_t - cpu_s[i]
        if max(copy_t, cpu_t) < best_t:
            best, best_t = n, max(copy_t, cpu_t)
    copied = set(order[:best])
    return [i in copied for i in range(len(cpu_s))]


def split_seconds(cpu_s: list[float], copy_s: list[float], copied: list[bool]) -> float:
    """The time of a split at the rates: its two sides run at the same time."""
    return max(sum(t for t, c in zip(copy_s, copied) if c), sum(t for t, c in zip(cpu_s, copied) if not c))


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

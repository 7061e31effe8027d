"""A step-time model for the simulator and for skip-join's prefill estimate.

Any callable `iteration_time(num_prefill_tokens, num_decode_seqs, total_context_tokens) -> seconds` plugs in
(the planner's cost model, or a profile fitted online). The default is linear in the three counts, with
constants for a Llama-3-8B shape in bf16 on one H100 (figures from shared/REFERENCE.md):

- `step_overhead_s` = 7.0 ms: every step streams all 16.1 GB of weights from HBM once (~5.4 ms at the
  2.95 TB/s measured copy rate) plus ~1.6 ms of launch and Python overhead per step.
- `s_per_token` = 35 us: 2 x 8.03e9 = 16.1 GFLOP per token (prefill or decode) at ~60% of the 777 TFLOP/s
  measured bf16 matmul rate.
- `s_per_context_token` = 44 ns: attention reads 128 KiB of KV per cached token (32 layers x 8 KV heads x
  128 dims x K and V x 2 bytes) at 2.95 TB/s.

Prefill attention's quadratic FLOPs are left out: under ~8k tokens they are a small share of the matmuls.

Those constants are only the default of the simulator. A serving engine builds its model with
`LinearCostModel.from_rates` from the model it serves (FLOPs per token, weight and KV bytes) and the rates its
device was measured at, so that skip-join places jobs by this model's prefill time on this machine.

`s_per_seq` (default 0) is host time per scheduled sequence: scheduling, batch building, detokenization and
streaming each token to its client. It is what a GPU-only model misses on a real server (bench/RESULTS.md
section 4b); `flexserve bench serve --simulate --sim-seq-overhead-us N` sets it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

LLAMA3_8B_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
H100_PCIE_BYTES_PER_S = 53.1e9  # pinned host->GPU, measured


class IterationTimeFn(Protocol):
    def __call__(self, num_prefill_tokens: int, num_decode_seqs: int, total_context_tokens: int) -> float: ...


@dataclass(frozen=True)
class LinearCostModel:
    """Step time = overhead + per-token compute + per-cached-token attention reads (seconds)."""

    step_overhead_s: float = 7.0e-3
    s_per_token: float = 35e-6
    s_per_context_token: float = 44e-9
    s_per_seq: float = 0.0

    @classmethod
    def from_rates(cls, flops_per_token: float, weight_bytes: float, kv_bytes_per_token: float,
                   matmul_flops: float, memory_bw: float, matmul_efficiency: float = 0.6,
                   launch_overhead_s: float = 1.6e-3, s_per_seq: float = 0.0) -> "LinearCostModel":
        """The step-time model of one served model on one device, from plain numbers (the scheduler stays
        free of torch; the engine measures them): every step reads the weights once (`weight_bytes /
        memory_bw`) plus a fixed launch cost, every token costs its matmul FLOPs at `matmul_efficiency` of the
        measured rate, every cached token its K and V read from memory. The defaults' figures (a Llama-3-8B
        shape on an H100: 16.1 GFLOP and 16.1 GB, 128 KiB of KV per token) give back the defaults."""
        for name, v in (("flops_per_token", flops_per_token), ("weight_bytes", weight_bytes),
                        ("kv_bytes_per_token", kv_bytes_per_token), ("matmul_flops", matmul_flops),
                        ("memory_bw", memory_bw), ("matmul_efficiency", matmul_efficiency)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        return cls(step_overhead_s=weight_bytes / memory_bw + launch_overhead_s,
                   s_per_token=flops_per_token / (matmul_flops * matmul_efficiency),
                   s_per_context_token=kv_bytes_per_token / memory_bw, s_per_seq=s_per_seq)

    def __call__(self, num_prefill_tokens: int, num_decode_seqs: int, total_context_tokens: int,
                 num_seqs: int | None = None) -> float:
        host = self.s_per_seq * (num_seqs if num_seqs is not None else num_decode_seqs)
        return (self.step_overhead_s + self.s_per_token * (num_prefill_tokens + num_decode_seqs)
                + self.s_per_context_token * total_context_tokens + host)


def prefill_time_from(iteration_time: IterationTimeFn):
    """Turn any step-time model into a batch-1 time-to-first-token estimate `prompt_len -> seconds`, which
    is what skip-join places new jobs by."""
    def prefill_time(prompt_len: int) -> float:
        return iteration_time(prompt_len, 0, prompt_len)
    return prefill_time


def swap_time_per_block(block_size: int, kv_bytes_per_token: int = LLAMA3_8B_KV_BYTES_PER_TOKEN,
                        bytes_per_s: float = H100_PCIE_BYTES_PER_S) -> float:
    """Seconds to copy one KV block over PCIe from/to pinned memory (16-token blocks: ~40 us)."""
    return block_size * kv_bytes_per_token / bytes_per_s

"""Serving settings that fit the machine: the KV pool, seats, token budget and chunk size a server starts with
when the user does not set them.

Why not fixed numbers: the right token budget depends on how fast the device multiplies for this model (a step
of 2,048 prompt tokens is 47 ms for an 8B model on an H200 but 3 ms for a 135M one), and the right number of
seats on how many contexts the KV pool holds. Fixed defaults leave a small model's steps launch-bound and a
large GPU's pool mostly empty.

The rules, each from a measured quantity:
- token budget: the largest power of two whose prompt tokens the device computes within `target_step_s`
  (the time a decoding request waits for a step that also carries prompt chunks), at least 2,048 tokens (below
  that the matmuls leave the tensor cores idle) and at most 16,384 (activation memory);
- prefill chunk: the whole budget (the query-tiled attention kernel makes long chunks cheap);
- seats: as many contexts of `typical_context` tokens as the GPU pool holds, at most 256 (a decode step of 256
  sequences already reads the weights once per 256 tokens; more seats buy little and cost graph captures);
- KV pool: what is left of free device memory after an activation reserve for one full-budget step.

On a CPU the engine keeps modest fixed values: tests and small demos run there, and nothing is measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig

GiB = 1 << 30
MIN_BUDGET, MAX_BUDGET = 2048, 16384
MAX_SEATS = 256


@dataclass(frozen=True)
class DeviceRates:
    """What the defaults are derived from: matmul FLOP/s in the serving dtype and memory bytes/s."""

    matmul_flops: float
    memory_bw: float


@dataclass(frozen=True)
class ServingDefaults:
    """The engine's resolved settings and, for each, the reason printed at start."""

    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_chunk_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    reasons: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [f"engine: max_num_seqs={self.max_num_seqs} max_num_batched_tokens={self.max_num_batched_tokens} "
                 f"prefill_chunk_size={self.prefill_chunk_size} num_gpu_blocks={self.num_gpu_blocks} "
                 f"num_cpu_blocks={self.num_cpu_blocks}"]
        return "\n".join(lines + [f"  {r}" for r in self.reasons])


def measure_rates(device: torch.device, dtype: torch.dtype, n: int = 4096, copy_bytes: int = GiB // 2,
                  reps: int = 20) -> DeviceRates:
    """Time an n^3 matmul in `dtype` and a device copy of `copy_bytes` (about 0.1 s on a datacenter GPU with the
    defaults; callers on a CPU pass small sizes). Averages `reps` matmuls and half as many copies, after one
    warm-up of each."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn, count: int) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        sync()
        return max((time.perf_counter() - t0) / count, 1e-9)

    mm_s = timed(lambda: a @ b, reps)
    copy_s = timed(lambda: dst.copy_(src), max(1, reps // 2))
    return DeviceRates(matmul_flops=2 * n ** 3 / mm_s, memory_bw=2 * src.numel() / copy_s)


def derive_defaults(cfg: ModelConfig, block_bytes: int, block_size: int, free_bytes: int, rates: DeviceRates | None,
                    host_blocks: int, target_step_s: float = 0.05, typical_context: int = 2048,
                    max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                    prefill_chunk_size: int | None = None, num_gpu_blocks: int | None = None) -> ServingDefaults:
    """Fill in every setting left as None. `rates` None means a CPU: fixed small values, nothing measured.

    `block_bytes`: one KV block over all layers; `free_bytes`: device memory free after the weights;
    `host_blocks`: the pinned host pool's blocks (already decided by the caller)."""
    reasons = []
    if rates is None:
        budget = max_num_batched_tokens or 2048
        chunk = prefill_chunk_size or min(512, budget)
        gpu_blocks = num_gpu_blocks or max(16, GiB // block_bytes)
        seats = max_num_seqs or min(64, budget)
        return ServingDefaults(seats, budget, chunk, gpu_blocks, host_blocks, ("CPU: fixed defaults",))
    flops_per_token = 2 * cfg.num_layers * cfg.num_layer_params()  # the LM head runs for sampled rows only
    if max_num_batched_tokens is None:
        fits = target_step_s * rates.matmul_flops / flops_per_token
        budget = 1 << max(0, int(fits).bit_length() - 1)
        budget = min(MAX_BUDGET, max(MIN_BUDGET, budget))
        reasons.append(f"token budget {budget}: a full step of prompt tokens is ~"
                       f"{budget * flops_per_token / rates.matmul_flops * 1e3:.0f} ms at "
                       f"{rates.matmul_flops / 1e12:.0f} TFLOP/s (target {target_step_s * 1e3:.0f} ms, "
                       f"within {MIN_BUDGET}-{MAX_BUDGET})")
    else:
        budget = max_num_batched_tokens
    chunk = prefill_chunk_size or budget
    if num_gpu_blocks is None:
        # One full step's activations: the widest projection output for every token, a few times over.
        act = 4 * budget * max(cfg.intermediate_size * 2, cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size) * 2
        act += budget * cfg.vocab_size * 4 // 8  # logits of the sampled rows (at most every 8th token) in fp32
        pool = int(free_bytes * 0.9) - act
        gpu_blocks = max(16, pool // block_bytes)
        reasons.append(f"KV pool {gpu_blocks} blocks ({gpu_blocks * block_bytes / GiB:.1f} GiB, "
                       f"{gpu_blocks * block_size} tokens): 90% of free memory less {act / GiB:.1f} GiB for "
                       f"one step's activations")
    else:
        gpu_blocks = num_gpu_blocks
    if max_num_seqs is None:
        contexts = gpu_blocks * block_size // min(typical_context, cfg.max_position)
        seats = max(1, min(MAX_SEATS, budget, contexts))
        reasons.append(f"seats {seats}: the pool holds {contexts} contexts of "
                       f"{min(typical_context, cfg.max_position)} tokens (at most {MAX_SEATS})")
    else:
        seats = max_num_seqs
    return ServingDefaults(seats, budget, chunk, gpu_blocks, host_blocks, tuple(reasons))

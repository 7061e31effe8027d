"""`serve --policy auto`: weight placement, KV pool and seats for an online server under memory caps.

An online server has no fixed block of sequences: its step carries as many running sequences as it has seats,
each reading its own context from a paged KV pool on the GPU. So the choice is different from the offline
search. For each split of the weights that whole tensors allow (`weight_options`, most on the GPU first),
the GPU keeps its share of the weights, two layers' staging when any weight streams, one full step's
activations and the runtime; what is left is the KV pool, and the pool sets the seats (`max_num_seqs`
contexts of `typical_context` tokens, at most 256). A decode step reads the streamed weights over the host
link, the resident ones and every seat's context from GPU memory, and multiplies every seat's token:

    step = max(streamed weights / h2d, (all weights + seats * context * KV bytes) / HBM bw,
               seats * FLOPs per token / FLOP/s) + layers * per-layer overhead

and the split of highest `seats / step` wins (ties to more weights on the GPU). The host pool (`num_cpu_blocks`,
where preempted sequences' blocks are swapped) takes what the CPU cap leaves after its share of the weights, at
most 4 GiB (a quarter of the pool on one-memory machines). The weights' split is counted the way the executor's
memory check counts it (`offload.budget.weight_bytes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import PolicyError
from ..offload.budget import weight_bytes
from ..offload.policy import Policy
from .cost_model import CPU_PROCESS_BYTES, GPU_RUNTIME_BYTES
from .hardware import Hardware, format_size
from .search import weight_options
from .sizes import dtype_name, model_sizes

GIB = 1 << 30
MAX_SEATS = 256


@dataclass(frozen=True)
class ServingPlan:
    """What `serve --policy auto` passes to `EngineConfig`, and the model's reading of it."""

    policy: Policy  # the weights' placement (the cache is the engine's paged pool)
    num_gpu_blocks: int
    num_cpu_blocks: int
    max_num_seqs: int
    decode_tok_s: float  # predicted, with every seat busy at `typical_context` tokens
    step_s: float
    bottleneck: str
    hardware: Hardware

    def summary(self) -> str:
        return (f"{self.policy.percent_flags().split(' --gpu-batch-size')[0]} num_gpu_blocks={self.num_gpu_blocks} "
                f"num_cpu_blocks={self.num_cpu_blocks} max_num_seqs={self.max_num_seqs}: predicted "
                f"{self.decode_tok_s:,.1f} tok/s decode with every seat busy ({self.step_s * 1e3:.1f} ms per step, "
                f"bound by {self.bottleneck}), on the '{self.hardware.name}' profile")


def serving_plan(config: ModelConfig, hardware: Hardware, dtype_bytes: int = 2, dtype: str | None = None,
                 block_size: int = 16, typical_context: int = 2048, max_num_batched_tokens: int = 2048,
                 allow_disk: bool = False, quant: dict | None = None) -> ServingPlan:
    """The fastest weight placement with its KV pool and seats that fit `hardware`'s (capped) sizes. `quant`:
    the `Policy` quantization fields the server will run with (weights counted as stored, an fp8 KV pool at one
    byte per value)."""
    quant = quant or {}
    limits, pool = hardware.limits(), hardware.pool_limit()
    sz = model_sizes(config, Policy(**quant), dtype_bytes)
    context = max(1, min(typical_context, config.max_position))
    kv_token = config.kv_bytes_per_token(1 if quant.get("kv_cache_dtype") == "fp8" else dtype_bytes)
    per_block = kv_token * block_size
    budget = max_num_batched_tokens
    act = 4 * budget * max(config.intermediate_size * 2, config.q_size + 2 * config.kv_size,
                           config.hidden_size) * dtype_bytes + budget * config.vocab_size * 4 // 8
    flops_token = 2 * config.num_layers * config.num_layer_params()
    flops = hardware.gpu_flops(dtype or dtype_name(dtype_bytes))
    min_blocks = max(16, math.ceil(context / block_size))
    best: tuple[float, ServingPlan] | None = None
    reasons = []
    for share_gpu, share_cpu, w_gpu, w_cpu in sorted(weight_options(config), key=lambda o: (-o[0], -o[1])):
        policy = Policy(w_gpu_percent=w_gpu, w_cpu_percent=w_cpu, **quant)
        w = weight_bytes(config, policy, dtype_bytes)
        if w.disk and not allow_disk:
            continue
        staging = 2 * sz.layer_w + sz.embed_w + sz.head_w if w_gpu < 100 else 0.0
        gpu_fixed = w.gpu + staging + act + (0.0 if pool is not None else GPU_RUNTIME_BYTES)  # no CUDA runtime
        cpu_fixed = w.cpu + CPU_PROCESS_BYTES
        if pool is not None:  # one memory: the GPU pool takes three quarters of what is left, swaps the rest
            left = pool - gpu_fixed - cpu_fixed
            gpu_kv, cpu_kv = 0.75 * left, min(0.25 * left, 4 * GIB)
        else:
            gpu_kv, cpu_kv = limits["gpu"] - gpu_fixed, min(limits["cpu"] - cpu_fixed, 4 * GIB)
        if gpu_kv < min_blocks * per_block or cpu_kv < 0:
            reasons.append(f"{w_gpu}/{w_cpu}: GPU {format_size(gpu_fixed)} fixed, KV pool {format_size(gpu_kv)}")
            continue
        gpu_blocks = int(gpu_kv // per_block)
        cpu_blocks = max(1, int(cpu_kv // per_block))
        seats = max(1, min(MAX_SEATS, budget, gpu_blocks * block_size // context))
        terms = {"pcie weights": (w.cpu + w.disk) / hardware.h2d_pinned_bw + w.disk / hardware.disk_read_bw,
                 "gpu memory bandwidth": (w.gpu + w.cpu + w.disk + seats * context * kv_token) / hardware.gpu_mem_bw,
                 "gpu compute": seats * flops_token / flops}
        bottleneck = max(terms, key=terms.get)
        step = terms[bottleneck] + (config.num_layers + 2) * hardware.layer_overhead_s
        plan = ServingPlan(policy, gpu_blocks, cpu_blocks, seats, seats / step, step, bottleneck, hardware)
        if best is None or plan.decode_tok_s > best[0] * (1 + 1e-6):  # ties (to rounding) keep more on GPU
            best = (plan.decode_tok_s, plan)
    if best is None:
        raise PolicyError(
            f"no weight placement leaves a KV pool of {min_blocks} blocks ({format_size(min_blocks * per_block)}, "
            f"one context of {context} tokens) under the caps GPU {format_size(limits['gpu'])} / CPU "
            f"{format_size(limits['cpu'])}" + (f" (one memory: {format_size(pool)})" if pool is not None else "")
            + ("" if allow_disk else "; weights on disk need --offload-dir")
            + (f"; the closest: {reasons[-1]}" if reasons else ""))
    return best[1]

"""The cost model across several GPUs: one rank's share of the work plus the communication between ranks.

A tensor x pipeline grid of `tp * pp` GPUs runs, on every rank, a model with 1/tp of the heads and MLP columns
and 1/pp of the layers (the shapes `flexserve.parallel` gives each rank). Its time is the single-GPU cost model
(`estimate`) of that shard under the same placement policy, on that rank's memory, plus `comm_time`: two
all-reduces per layer for tensor parallelism (never overlapped), and the stage-to-stage hops for pipeline
parallelism. With `m` micro-batches, a decode step keeps `pp` stages busy only if `m >= pp`: the step takes
`max(m, pp) / m` stage-times (every micro-batch needs the previous token of its own rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import PolicyError
from ..offload.policy import Policy
from ..parallel.cost import comm_time
from ..parallel.groups import check_degrees
from ..parallel.tensor import shard_config
from .cost_model import Estimate, estimate
from .hardware import Hardware


@dataclass
class ParallelEstimate:
    """Predicted throughput of a tp x pp grid; `stage` is one rank's single-GPU estimate."""

    tp: int
    pp: int
    micro_batches: int
    stage: Estimate
    comm_prefill_s: float
    comm_decode_s: float
    prefill_s: float
    decode_s_per_step: float
    prefill_tok_s: float
    decode_tok_s: float
    total_tok_s: float

    @property
    def comm_fraction(self) -> float:
        """Share of a decode step spent communicating."""
        return self.comm_decode_s / self.decode_s_per_step if self.decode_s_per_step else 0.0


def rank_config(config: ModelConfig, tp: int, pp: int) -> ModelConfig:
    """One rank's share of a tp x pp grid (1/tp of every layer, 1/pp of the layers), after the same checks a
    launch makes (`check_degrees`)."""
    check_degrees(config, tp, pp, tp * pp)
    return shard_config(config, tp).replace(num_layers=math.ceil(config.num_layers / pp))


def estimate_parallel(config: ModelConfig, policy: Policy, hardware: Hardware, prompt_len: int, gen_len: int,
                      tp: int = 1, pp: int = 1, micro_batches: int | None = None, dtype_bytes: int = 2,
                      dtype: str | None = None, link_bw: float | None = None) -> ParallelEstimate:
    """Throughput of `policy` (each rank's placement, `hardware` describing one rank's GPU and its share of the
    host) on a tp x pp grid. `link_bw` overrides the profile's `gpu_link_bw`."""
    m = micro_batches or pp
    block = policy.block_size
    # A stage runs its layers once per micro-batch, each time for block/m rows: weights are streamed and
    # rebuilt m times per step, so a weight-bound stage gains nothing from the split (only the bubbles go).
    mb_policy = policy.replace(gpu_batch_size=max(1, math.ceil(policy.gpu_batch_size / m))) if pp > 1 else policy
    stage = estimate(rank_config(config, tp, pp), mb_policy, hardware, prompt_len, gen_len, dtype_bytes, dtype,
                     placed=True)
    bw = link_bw or hardware.gpu_link_bw
    grid = tp > 1 or pp > 1
    if grid and bw <= 0:
        raise PolicyError(f"hardware profile {hardware.name!r} has no gpu_link_bw: give the GPU link bandwidth")

    def comm(seq: int) -> float:
        return comm_time(config, tp, pp, block, seq, bw, dtype_bytes, hardware.gpu_link_latency_s) if grid else 0.0
    comm_prefill, comm_decode = comm(prompt_len), comm(1)
    if pp > 1:  # per token step each stage is busy m micro-batch slots, or idles until pp have passed
        prefill = (m + pp - 1) * stage.prefill_s + comm_prefill
        step = max(m, pp) * stage.decode_s_per_step + comm_decode
    else:
        prefill = stage.prefill_s + comm_prefill
        step = stage.decode_s_per_step + comm_decode
    total = prefill + (gen_len - 1) * step
    return ParallelEstimate(tp=tp, pp=pp, micro_batches=m, stage=stage, comm_prefill_s=comm_prefill,
                            comm_decode_s=comm_decode, prefill_s=prefill, decode_s_per_step=step,
                            prefill_tok_s=block * prompt_len / prefill, decode_tok_s=block / step,
                            total_tok_s=block * gen_len / total)

"""Cost terms of a mixture-of-experts decoder layer whose experts are placed one by one (`offload.experts`).

A GPU batch of T tokens routes T·k token slots over E experts. With the router's choices taken as uniform, the
expected number of distinct experts it hits is E·(1 - (1 - k/E)^T): k for one token, all E for a large
prefill. Only those experts are read (from HBM when they live on the GPU), and each one that lives off the GPU
costs either its bytes at the PCIe rate (copied in) or its tokens' FLOPs at the CPU rate plus one read of its
weights from host memory (computed where it lives); a disk-resident expert is read from disk first either way.
The executor's rule `auto` divides a layer's off-GPU experts between the two sides, which run at the same time
(`offload.expert_rates.split_experts`); the model copies the fraction c / (c + p) of them (c and p: one
expert's CPU and copy seconds), where both sides take equally long. That is the division of a continuum of
experts: a layer that reaches one or two off-GPU experts cannot always split that evenly, so at batch 1 the
model is optimistic by up to a fifth. The fixed rules copy all or none. Dense weights (attention, router,
norms, shared expert) go to the GPU first, so the weights off the GPU are taken to be experts.

The executor keeps the most routed experts on the GPU (`offload.hot_experts`). With `hot_capture`, the
fraction of routed tokens those GPU experts take, each expert off the GPU is reached as if it had the
uniform k/E of a token scaled by (1 - hot_capture) / (1 - g), g the GPU's share of the experts: the skew
moves traffic, not bytes. Left out, routing is uniform (hot_capture = g) and nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..compression.config import compression_ratio
from ..config import ModelConfig
from ..memory.tiers import Tier
from ..offload.experts import (EXPERT_SLOTS, ExpertRates, assign_moe_tiers, expected_experts_hit,
                               expert_index, expert_seconds, expert_slots, off_gpu_experts, slots_hold)
from ..offload.policy import Policy
from .hardware import Hardware
from .linear import Linear


@dataclass(frozen=True)
class MoeLayer:
    """One MoE decoder layer run over one GPU batch, the placement left free."""

    active_params: float  # parameters one token computes with (dense weights and k experts)
    hit: float  # expected experts the batch reaches
    read_bytes16: float  # bytes of weights the GPU reads for the batch: dense ones and the hit experts'
    expert_bytes: float  # one expert, as stored
    copy_fraction: float  # of the off-GPU experts reached, the share copied in (the rest computed on the CPU)
    expert_cpu_s: float  # one hit expert computed on the CPU
    hit_per_share: float  # hit experts off the GPU per unit of the layer's off-GPU share

    def off_gpu_terms(self, hw: Hardware, share_gpu: Linear, share_disk: Linear, batches: int,
                      ) -> tuple[dict[str, Linear], dict[str, Linear]]:
        """(load terms, compute terms) of the block's batches for the experts that live off the GPU."""
        n = batches * self.hit_per_share
        load: dict[str, Linear] = {"weights disk": share_disk * (n * self.expert_bytes / hw.disk_read_bw)}
        compute: dict[str, Linear] = {}
        if self.copy_fraction > 0:
            load["experts pcie"] = (1 - share_gpu) * (self.copy_fraction * n * self.expert_bytes / hw.h2d_pinned_bw)
        if self.copy_fraction < 1:
            compute["cpu experts"] = (1 - share_gpu) * ((1 - self.copy_fraction) * n * self.expert_cpu_s)
        return load, compute


def moe_layer(config: ModelConfig, policy: Policy, hw: Hardware, tokens: float, dtype_bytes: int,
              hot_capture: float | None = None) -> MoeLayer:
    """The terms of one GPU batch of `tokens` new tokens (gpu_batch_size × tokens per sequence); `hot_capture`:
    the fraction of routed tokens the GPU's experts take (None: uniform routing, see the module docstring)."""
    cfg, b = config, dtype_bytes
    stored = b * (compression_ratio(policy.comp_num_bits, policy.comp_group_size, b) if policy.compress_weight
                  else 1.0)  # bytes per parameter of an expert as it moves (packed with compress_weight)
    expert, layer, k = cfg.expert_params(), cfg.num_layer_params(), cfg.experts_per_token
    hit = expected_experts_hit(cfg.num_experts, k, tokens)
    cold_k = k * cold_traffic(cfg, policy, hot_capture)  # an off-GPU expert's share of a token, times E
    cold_hit = expected_experts_hit(cfg.num_experts, min(cold_k, cfg.num_experts), tokens)
    rates = ExpertRates(cpu_flops=hw.cpu_flops, host_read_bytes=hw.cpu_mem_bw, pcie_bytes=hw.h2d_pinned_bw)
    per_expert_tokens = max(1.0, tokens * cold_k / max(cold_hit, 1e-9))  # tokens of one reached off-GPU expert
    cpu_s, copy_s = expert_seconds(per_expert_tokens, expert, stored, rates)
    fraction = {"copy": 1.0, "cpu": 0.0}.get(policy.expert_compute, cpu_s / (cpu_s + copy_s))
    return MoeLayer(active_params=cfg.active_layer_params(), hit=hit,
                    read_bytes16=(layer - (cfg.num_experts - hit) * expert) * b, expert_bytes=expert * stored,
                    copy_fraction=fraction, expert_cpu_s=cpu_s,
                    hit_per_share=cold_hit * layer / (expert * cfg.num_experts))


def cold_traffic(config: ModelConfig, policy: Policy, hot_capture: float | None) -> float:
    """How many times the uniform share of the routed tokens one expert off the GPU gets, when the experts
    `policy` keeps on the GPU take `hot_capture` of them (1 when None, or when no expert or every expert is
    on the GPU)."""
    if hot_capture is None:
        return 1.0
    if not 0 <= hot_capture <= 1:
        raise ValueError(f"hot_capture must be within 0..1, got {hot_capture}")
    tiers = assign_moe_tiers(config.layer_weight_sizes(), policy.w_gpu_percent, policy.w_cpu_percent)
    gpu = len({expert_index(n) for n, t in tiers.items() if t is Tier.GPU} - {None}) / config.num_experts
    return 1.0 if gpu in (0.0, 1.0) else (1 - hot_capture) / (1 - gpu)


def staging_bytes(config: ModelConfig, dtype_bytes: int, slots: int = EXPERT_SLOTS) -> float:
    """GPU staging one MoE layer needs while its experts run one by one: its dense weights if they stream, and
    the executor's expert slots (`offload.experts.expert_slots`; instead of two whole layers)."""
    expert = config.expert_params()
    return (config.num_layer_params() - config.num_experts * expert + slots * expert) * dtype_bytes


def reuses_across_block(config: ModelConfig, policy: Policy, block_tokens: float) -> bool:
    """Whether the block's GPU batches share the experts they copy: several batches, a rule that copies, and
    slots for every off-GPU expert the block's `block_tokens` reach (then each crosses once per layer and
    block; the CPU's share is still computed, and its weights read, batch by batch)."""
    if policy.num_gpu_batches <= 1 or policy.expert_compute == "cpu":
        return False
    hit = expected_experts_hit(config.num_experts, config.experts_per_token, block_tokens)
    return slots_hold(expert_slots(config, policy), off_gpu_experts(config, policy), hit)


def applies(config: ModelConfig, policy: Policy) -> bool:
    """Whether the executor runs `config`'s experts one by one under `policy` (see `offload.placement`)."""
    from ..offload.placement import per_expert

    return config.is_moe and per_expert(config.layer_weight_sizes())


def reached_expert_bytes(executor, gpu_batch_size: int, num_gpu_batches: int,
                         shared_copies: bool = True) -> dict[str, float]:
    """Bytes of off-GPU experts a decode step is expected to reach, by tier (`cpu`, `disk`): per layer and GPU
    batch, the experts its `gpu_batch_size` tokens hit, in the proportion the layer keeps off the GPU; with
    `shared_copies` (what crosses PCIe), once per layer and block, the experts the whole block hits, when the
    slots hold them for the block's later batches. What the transfer bound of a mixture of experts counts in
    place of whole streamed layers; the CPU computes, and reads, each batch's experts (`shared_copies=False`)."""
    cfg = executor.cfg
    if not cfg.is_moe:
        return {"cpu": 0.0, "disk": 0.0}
    hit = expected_experts_hit(cfg.num_experts, cfg.experts_per_token, gpu_batch_size)
    times = num_gpu_batches
    block_hit = expected_experts_hit(cfg.num_experts, cfg.experts_per_token, gpu_batch_size * num_gpu_batches)
    off = max((sum(1 for n in layer.experts if n.endswith("up.weight")) for layer in executor.layers), default=0)
    if shared_copies and num_gpu_batches > 1 and slots_hold(executor.experts.slots, off, block_hit):
        hit, times = block_hit, 1  # held for the block's later batches
    out = {"cpu": 0.0, "disk": 0.0}
    for layer in executor.layers:
        for h in layer.experts.values():  # each expert's up and down, on its tier (packed ones on the GPU too)
            if h.tier.value in out:
                out[h.tier.value] += times * hit / cfg.num_experts * h.nbytes
    return out

"""Kernels one decoder layer launches per GPU batch in a decode step, counted from the layer's own code.

A decode step of a small batch is host-bound on a fast GPU: the H200 runs a 7B layer's GEMMs for 32 sequences
in about 0.2 ms, while PyTorch spends 0.5-0.8 ms on the host issuing the layer's kernels. That host time grows
with the number of kernels a layer launches, and the number differs by family (an OPT layer launches 12, a Llama
layer 15 with its two rotary kernels, Qwen2 one more for the q/k/v bias). The cost model charges each layer
`layer_overhead_s * layer_launches(config) / REFERENCE_LAUNCHES` of host time, where `layer_overhead_s` is what
`flexserve calibrate` measures for its reference layer (10 launches).

The count runs `attention_in` and `attention_out` of `flexserve.models.layers` on meta tensors (no memory, no
device) and counts every aten operator that computes (views and allocations launch nothing); each fused kernel
(RMSNorm, rotary embedding, SiLU-and-multiply) counts once, as on a GPU, where it is one Triton launch.
Attention itself belongs to the caller: two cache writes and one attention kernel.
"""
from __future__ import annotations

import dataclasses
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ModelConfig

REFERENCE_LAUNCHES = 10  # calibrate's reference layer: 2 norms, 4 projections, attention, relu, 2 adds
ATTENTION_LAUNCHES = 3  # the new token's key and value written into the cache, then one attention kernel
FUSED_LAUNCH_WEIGHT = 1.5

_NO_KERNEL = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
              torch.ops.aten._unsafe_view, torch.ops.aten.detach, torch.ops.aten.lift_fresh}
_FUSED = ("rms_norm", "rope", "silu_mul")  # names `flexserve.models.layers` calls them by


class _Counter(TorchDispatchMode):
    """Counts the operators dispatched under it that launch a kernel; `paused` while a fused kernel's
    reference math runs (it counts once, by its wrapper)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not _is_free(func):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def one_launch(self, reference):
        def fused(*args, **kwargs):
            self.count += FUSED_LAUNCH_WEIGHT
            self.paused = True
            try:
                return reference(*args, **kwargs)
            finally:
                self.paused = False
        return fused


def _is_free(func) -> bool:
    return func.is_view or func.overloadpacket in _NO_KERNEL


def _dense_stand_in(cfg: ModelConfig) -> ModelConfig:
    """A mixture's layer counted as its dense twin: the experts' own launches are the expert streamer's
    (planner/moe_cost.py), which run beside the layer's."""
    if not cfg.is_moe:
        return cfg
    return dataclasses.replace(cfg, num_experts=0, experts_per_token=0, shared_expert_intermediate_size=0,
                               intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size)


_COUNTED: dict[str, float] = {}


def layer_launches(cfg: ModelConfig) -> float:
    """Kernels one decoder layer launches for one GPU batch at a decode step (one new token per sequence), a
    fused kernel weighted by `FUSED_LAUNCH_WEIGHT`."""
    key = repr(cfg)  # configs carry dicts (rope scaling), so they are not hashable
    if key not in _COUNTED:
        _COUNTED[key] = _count(cfg)
    return _COUNTED[key]


def _count(cfg: ModelConfig) -> float:
    from ..models import layers

    cfg = _dense_stand_in(cfg)
    meta = torch.device("meta")
    w = {name: torch.empty(shape, device=meta, dtype=torch.float16)
         for name, shape in cfg.layer_weight_shapes().items()}
    x = torch.empty(2, 1, cfg.hidden_size, device=meta, dtype=torch.float16)
    rope = None
    if cfg.positional == "rope":
        half = torch.empty(2, 1, 1, cfg.head_dim, device=meta, dtype=torch.float16)
        rope = (half, half)
    counter = _Counter()
    patches = [mock.patch.object(layers, name, counter.one_launch(getattr(layers, name))) for name in _FUSED]
    for p in patches:
        p.start()
    try:
        with torch.inference_mode(), counter:
            q, _, _ = layers.attention_in(cfg, w, x, rope)
            counter.count += ATTENTION_LAUNCHES
            attn = q.reshape(q.shape[0], q.shape[1], -1)
            layers.attention_out(cfg, w, x, attn)
    finally:
        for p in patches:
            p.stop()
    return counter.count


def host_seconds(cfg: ModelConfig, layer_overhead_s: float) -> float:
    """Host seconds to issue one decoder layer for one GPU batch, from the reference layer's measured time."""
    return layer_overhead_s * layer_launches(cfg) / REFERENCE_LAUNCHES

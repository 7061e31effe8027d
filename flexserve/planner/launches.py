"""Kernels one decoder layer launches per GPU batch in a decode step, counted from the layer's own code.

A decode step of a small batch is host-bound on a fast GPU: the H200 runs a 7B layer's GEMMs for 32 sequences
in about 0.2 ms, while PyTorch spends 0.5-0.8 ms on the host issuing the layer's kernels. That host time grows
with the kernels a layer launches, and with their kind: Triton's launcher runs in Python and costs the host
more than an aten kernel, whose dispatch is C++. The cost model charges each layer
`layer_overhead_s * layer_launches(config) / REFERENCE_LAUNCHES` of host time, where `layer_overhead_s` is what
`flexserve calibrate` measures for its reference layer of 10 aten launches.

The count runs `attention_in` and `attention_out` of `flexserve.models.layers` on meta tensors (no memory, no
device) and counts every aten operator that computes (views and allocations launch nothing). Each fused
kernel the layer calls (RMSNorm, rotary embedding, SiLU-and-multiply) counts `FUSED_LAUNCH_WEIGHT` where its
Triton kernel takes the shape, and its unfused operators where it does not. The weight, 1.5, is read off
profiles of resident decode on an H200 (bench/RESULTS.md, section 2): 0.57 ms per layer and batch for OPT-6.7B's
12 aten launches, 0.74 ms for Mistral-7B's 9 aten and 5 Triton ones. An OPT layer counts 12, a Llama-family
one 16.5 (a bias rides in its projection's GEMM), Qwen3's 19.5 with its q/k norms. Attention itself belongs to
the caller: two cache writes and one attention kernel. Quantized projections add their own kernels: a per-token
activation quantiser each for fp8 and int8, a Triton GEMM in place of an aten one for the 4-bit schemes.
"""
from __future__ import annotations

import dataclasses
import threading
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ModelConfig
from ..kernels.fused import rms_norm_fusable, rope_fusable

REFERENCE_LAUNCHES = 10  # calibrate's reference layer: 2 norms, 4 projections, attention, relu, 2 adds
ATTENTION_LAUNCHES = 3  # the new token's key and value written into the cache, then one attention kernel
FUSED_LAUNCH_WEIGHT = 1.5  # a Triton launch against an aten one, in host time
ACT_QUANT_SCHEMES = ("fp8", "int8")  # a per-token activation quantiser (Triton) before each projection
TRITON_GEMM_SCHEMES = ("rtn4", "awq")  # the fused 4-bit dequantise-and-multiply kernel replaces the GEMM

_NO_KERNEL = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
              torch.ops.aten._unsafe_view, torch.ops.aten.detach, torch.ops.aten.lift_fresh}
_COUNTING = threading.Lock()  # the count patches `flexserve.models.layers` for the whole process
_COUNTED: dict[tuple[str, str | None], float] = {}


class _Counter(TorchDispatchMode):
    """Counts the operators dispatched under it that launch a kernel; `paused` while a fused kernel's
    reference math runs (it counts once, by its wrapper). Only the counting thread's calls count."""

    def __init__(self):
        super().__init__()
        self.count = 0.0
        self.paused = False
        self.thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not (func.is_view or func.overloadpacket in _NO_KERNEL):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, original, fused_if=None, extra: float = 0.0):
        """`original` counted as one fused launch when `fused_if(*args)` holds, else by its own operators;
        plus `extra` launches per call."""
        def counted(*args, **kwargs):
            if threading.get_ident() != self.thread:
                return original(*args, **kwargs)
            self.count += extra
            if fused_if is None or not fused_if(*args):
                return original(*args, **kwargs)
            self.count += FUSED_LAUNCH_WEIGHT
            self.paused = True
            try:
                return original(*args, **kwargs)
            finally:
                self.paused = False
        return counted


def layer_launches(cfg: ModelConfig, quantization: str | None = None) -> float:
    """Kernels one decoder layer launches for one GPU batch at a decode step (one new token per sequence), a
    Triton launch weighted by `FUSED_LAUNCH_WEIGHT`, with its projections quantized by `quantization`."""
    key = (repr(cfg), quantization)  # configs carry dicts (rope scaling), so they are not hashable
    if key not in _COUNTED:
        with _COUNTING:
            _COUNTED[key] = _count(_dense_stand_in(cfg), quantization)
    return _COUNTED[key]


def host_seconds(cfg: ModelConfig, layer_overhead_s: float, quantization: str | None = None) -> float:
    """Host seconds to issue one decoder layer for one GPU batch, from the reference layer's measured time."""
    return layer_overhead_s * layer_launches(cfg, quantization) / REFERENCE_LAUNCHES


def _dense_stand_in(cfg: ModelConfig) -> ModelConfig:
    """A mixture's layer counted as its dense twin: the experts' own launches are the expert streamer's
    (planner/moe_cost.py), which run beside the layer's."""
    if not cfg.is_moe:
        return cfg
    return dataclasses.replace(cfg, num_experts=0, experts_per_token=0, shared_expert_intermediate_size=0,
                               intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size)


def _count(cfg: ModelConfig, quantization: str | None) -> float:
    from ..models import layers

    meta = torch.device("meta")
    w = {name: torch.empty(shape, device=meta, dtype=torch.float16)
         for name, shape in cfg.layer_weight_shapes().items()}
    x = torch.empty(2, 1, cfg.hidden_size, device=meta, dtype=torch.float16)
    rope = None
    if cfg.positional == "rope":
        half = torch.empty(2, 1, 1, cfg.head_dim, device=meta, dtype=torch.float16)
        rope = (half, half)
    per_projection = (FUSED_LAUNCH_WEIGHT if quantization in ACT_QUANT_SCHEMES else
                      FUSED_LAUNCH_WEIGHT - 1 if quantization in TRITON_GEMM_SCHEMES else 0.0)
    counter = _Counter()
    wrapped = {"rms_norm": counter.wrap(layers.rms_norm, lambda t, *_: rms_norm_fusable(t.shape[-1])),
               "rope": counter.wrap(layers.rope, lambda t, *_: rope_fusable(t.shape[-1])),
               "silu_mul": counter.wrap(layers.silu_mul, lambda *_: True),
               "linear": counter.wrap(layers.linear, extra=per_projection)}
    with mock.patch.multiple(layers, **wrapped), torch.inference_mode(), counter:
        q, _, _ = layers.attention_in(cfg, w, x, rope)
        counter.count += ATTENTION_LAUNCHES
        layers.attention_out(cfg, w, x, q.reshape(q.shape[0], q.shape[1], -1))
    return counter.count

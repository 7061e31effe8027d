"""Random ("dummy") weights of a preset shape, for benchmarks of models we do not have on disk.

Tensors are produced one layer at a time, already fused, in the runtime dtype and on the device that makes
them fastest (the GPU when there is one: random fill there runs at memory bandwidth, and a pinned copy to the
CPU tier costs ~50 GB/s), so a 175B shape never exists as a full fp32 copy.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .base import Tensors


class DummySource:
    """Uniform random weights in [-scale, scale]; norms are ones so activations stay finite."""

    is_fused = True  # layer_parts already returns canonical weights

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                 seed: int = 0, scale: float = 0.02):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.scale = scale

    def _make(self, shapes: dict[str, tuple[int, ...]], salt: int) -> Tensors:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + salt)
        out: Tensors = {}
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=self.dtype, device=self.device)
            if "norm.weight" in name:
                t.fill_(1.0)
            elif name.endswith(".bias") and "norm" in name:
                t.zero_()
            else:
                t.uniform_(-self.scale, self.scale, generator=gen)
            out[name] = t
        return out

    def global_parts(self) -> Tensors:
        return self._make(self.config.global_weight_shapes(), salt=-1)

    def layer_parts(self, index: int) -> Tensors:
        return self._make(self.config.layer_weight_shapes(), salt=index)

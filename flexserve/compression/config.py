"""How a tensor is quantised: bits per value, group size and the dimension groups run along."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flexserve.compression.names import STORED_SCHEMES
from flexserve.errors import PolicyError

SUPPORTED_BITS = (4, 8)
SUPPORTED_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compression_ratio(num_bits: int, group_size: int, dtype_bytes: int) -> float:
    """Stored bytes per original byte of group-wise quantisation: packed values plus an fp16 scale and min
    per group (4-bit, group 64, fp16: (0.5 + 4/64) / 2 = 0.28)."""
    return (num_bits / 8 + 4 / group_size) / dtype_bytes


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """Group-wise asymmetric min/max quantisation settings.

    Each run of `group_size` contiguous elements along `group_dim` (negative counts from the end, as in
    torch) is one group with its own scale and minimum. `scale_dtype=None` stores scale and minimum in
    the source tensor's dtype; `torch.float16` halves their size for an fp32 source at a small accuracy
    cost. 4-bit values are packed two per byte, so 4-bit needs an even `group_size`.
    """

    num_bits: int = 4
    group_size: int = 64
    group_dim: int = -1
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.num_bits) or self.num_bits not in SUPPORTED_BITS:
            raise PolicyError(f"compression num_bits must be one of {SUPPORTED_BITS}, got {self.num_bits!r}")
        if not _is_int(self.group_size) or self.group_size < 1:
            raise PolicyError(f"compression group_size must be a positive integer, got {self.group_size!r}")
        if self.num_bits == 4 and self.group_size % 2:
            raise PolicyError(f"4-bit compression packs two values per byte, so group_size must be even, "
                              f"got {self.group_size}")
        if not _is_int(self.group_dim):
            raise PolicyError(f"compression group_dim must be an integer, got {self.group_dim!r}")
        if self.scale_dtype is not None and self.scale_dtype not in SUPPORTED_SCALE_DTYPES:
            raise PolicyError(f"compression scale_dtype must be None or one of {SUPPORTED_SCALE_DTYPES}, "
                              f"got {self.scale_dtype!r}")

    @property
    def max_level(self) -> int:
        """The largest quantised value: 2**num_bits - 1."""
        return (1 << self.num_bits) - 1

    @property
    def values_per_byte(self) -> int:
        return 8 // self.num_bits

    def resolve_group_dim(self, ndim: int) -> int:
        """`group_dim` as a non-negative index for a tensor of `ndim` dimensions."""
        if not -ndim <= self.group_dim < ndim:
            raise PolicyError(f"compression group_dim {self.group_dim} is out of range for a "
                              f"{ndim}-dimensional tensor")
        return self.group_dim % ndim


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def layer_ratio(config, scheme: str | None, group_size: int, dtype_bytes: int, packed_ratio: float) -> float:
    """Stored bytes per original byte of a decoder layer under `--quantization` (`packed_ratio` without, and
    for mixtures of experts, whose experts stay unquantized): fp8 and int8 keep one byte per weight (their
    per-channel scales are negligible), the 4-bit schemes pack two per byte plus a scale and minimum in the
    model's dtype per group. Norm weights count as packed too, a rounding error of the count. `gguf` keeps
    what the file stores, which the config does not say (a K-quant file is read dense): it counts as unquantized,
    an upper bound."""
    if scheme is None or config.is_moe or scheme in STORED_SCHEMES:
        return packed_ratio
    if scheme in ("rtn4", "awq"):
        return (0.5 + 2 * dtype_bytes / group_size) / dtype_bytes
    return 1.0 / dtype_bytes


def kv_ratio(kv_cache_dtype: str, dtype_bytes: int) -> float:
    """Stored bytes per original byte of the KV cache: one byte per value with `--kv-cache-dtype fp8`."""
    return 1.0 / dtype_bytes if kv_cache_dtype == "fp8" else 1.0


def stored_bytes_with_layers_at(config, dtype_bytes: int, packed_ratio: float, layer_ratio: float) -> float:
    """A model's weight bytes as stored when its decoder layers are kept at `layer_ratio` (quantization) and the
    other non-embedding weights at `packed_ratio` (`ModelConfig.stored_weight_bytes`)."""
    layers = config.num_layer_params() * config.num_layers * dtype_bytes
    return config.stored_weight_bytes(dtype_bytes, packed_ratio) + layers * (layer_ratio - packed_ratio)

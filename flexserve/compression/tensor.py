"""`CompressedTensor`: the packed values and per-group scale/min of one quantised tensor.

Layout. A tensor of shape `shape` grouped along dimension `g` is stored with `g` moved last and split
into groups: with `lead = shape[:g] + shape[g+1:]` and `G = ceil(shape[g] / group_size)`,

    data:  uint8 [*lead, G, group_size // values_per_byte]
    scale: [*lead, G, 1]
    min:   [*lead, G, 1]

The other dimensions keep their order, so a slice along any dimension but `g` is a plain view of all
three buffers (`narrow`); this is how a KV cache [B, H, S, D] grouped along D takes new tokens.
A 4-bit group is packed by halves: byte j holds value j in its low nibble and value
j + group_size/2 in its high nibble, so unpacking writes two contiguous half-groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from flexserve.compression.config import CompressionConfig

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def grouped_shapes(shape: torch.Size | tuple[int, ...], config: CompressionConfig
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (data shape, scale/min shape) a tensor of `shape` compresses to."""
    gd = config.resolve_group_dim(len(shape))
    lead = tuple(shape[:gd]) + tuple(shape[gd + 1:])
    num_groups = math.ceil(shape[gd] / config.group_size)
    data_shape = lead + (num_groups, config.group_size // config.values_per_byte)
    return data_shape, lead + (num_groups, 1)


def compressed_nbytes(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, config: CompressionConfig) -> int:
    """Bytes a tensor of `shape` and `dtype` takes once compressed (packed data plus scale and min)."""
    data_shape, scale_shape = grouped_shapes(shape, config)
    scale_dtype = config.scale_dtype or dtype
    scale_bytes = math.prod(scale_shape) * torch.empty((), dtype=scale_dtype).element_size()
    return math.prod(data_shape) + 2 * scale_bytes


@dataclass(frozen=True, slots=True)
class CompressedTensor:
    """A group-wise quantised tensor; see the module docstring for the buffer layout.

    `shape` and `dtype` are those of the original tensor, which `decompress` gives back.
    """

    data: torch.Tensor    # uint8 [*lead, G, group_size // values_per_byte]
    scale: torch.Tensor   # [*lead, G, 1], (max - min) / (2**bits - 1)
    min: torch.Tensor     # [*lead, G, 1]
    shape: torch.Size
    dtype: torch.dtype
    config: CompressionConfig

    def __post_init__(self) -> None:
        data_shape, scale_shape = grouped_shapes(self.shape, self.config)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != data_shape:
            raise ValueError(f"packed data must be uint8 {data_shape}, got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        if tuple(self.scale.shape) != scale_shape or tuple(self.min.shape) != scale_shape:
            raise ValueError(f"scale and min must be {scale_shape}, got {tuple(self.scale.shape)} and "
                             f"{tuple(self.min.shape)}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"compression supports {SUPPORTED_DTYPES}, got {self.dtype}")

    @classmethod
    def empty(cls, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, config: CompressionConfig,
              device: torch.device | str | None = None, pin_memory: bool = False) -> CompressedTensor:
        """Uninitialised buffers for a tensor of `shape`, to be filled by `compress_into`."""
        data_shape, scale_shape = grouped_shapes(shape, config)
        scale_dtype = config.scale_dtype or dtype
        return cls(
            data=torch.empty(data_shape, dtype=torch.uint8, device=device, pin_memory=pin_memory),
            scale=torch.empty(scale_shape, dtype=scale_dtype, device=device, pin_memory=pin_memory),
            min=torch.empty(scale_shape, dtype=scale_dtype, device=device, pin_memory=pin_memory),
            shape=torch.Size(shape), dtype=dtype, config=config)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def group_dim(self) -> int:
        """The grouped dimension of the original tensor, as a non-negative index."""
        return self.config.resolve_group_dim(len(self.shape))

    @property
    def num_groups(self) -> int:
        """Groups along `group_dim` (the last one padded when the dimension is not a multiple)."""
        return self.data.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed data, scale and min together."""
        return self.data.nbytes + self.scale.nbytes + self.min.nbytes

    def is_pinned(self) -> bool:
        return self.data.is_pinned() and self.scale.is_pinned() and self.min.is_pinned()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompressedTensor:
        """A copy on `device` (all three buffers moved); `self` if it is already there."""
        return replace(self, data=self.data.to(device, non_blocking=non_blocking),
                       scale=self.scale.to(device, non_blocking=non_blocking),
                       min=self.min.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CompressedTensor:
        """A copy in pinned host memory, so later host-to-device copies can overlap compute."""
        return replace(self, data=self.data.pin_memory(), scale=self.scale.pin_memory(),
                       min=self.min.pin_memory())

    def narrow(self, dim: int, start: int, length: int) -> CompressedTensor:
        """A view of elements [start, start + length) along `dim`, sharing this tensor's buffers.

        `dim` may be any dimension but the grouped one. Writing into the view (`compress_into`) fills
        that slice of this tensor, e.g. the new tokens of a KV cache [B, H, S, D] grouped along D.
        """
        ndim = len(self.shape)
        if not -ndim <= dim < ndim:
            raise IndexError(f"dim {dim} is out of range for a {ndim}-dimensional tensor")
        dim %= ndim
        gd = self.group_dim
        if dim == gd:
            raise ValueError(f"cannot narrow along the grouped dimension {gd}")
        buf_dim = dim if dim < gd else dim - 1  # the grouped dimension was moved last in the buffers
        shape = list(self.shape)
        shape[dim] = length
        return replace(self, data=self.data.narrow(buf_dim, start, length),
                       scale=self.scale.narrow(buf_dim, start, length),
                       min=self.min.narrow(buf_dim, start, length), shape=torch.Size(shape))

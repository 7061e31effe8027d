"""Quantised weight matrices: small frozen dataclasses of tensors that a weight dict carries instead of a tensor.

A model's weight dict maps names to tensors; a quantised projection maps its name to one of these objects
instead, and `flexserve.compression.linear.linear` multiplies by either. Every object is only tensors plus a
few static numbers, so the offloading executor moves one as it moves a tensor: each tensor field is one part,
stored on a tier, pinned, read back into a slot of the same shape (`tensor_fields`, `with_tensors`,
`empty_like`). The bytes that cross PCIe are the quantised bytes.

All weights are [N, K] = [out_features, in_features] like `F.linear`'s. `smooth`, where set, is a per-input
channel divisor the activation takes before the matmul (SmoothQuant / AWQ scales that could not be folded into
a preceding op); the stored weight already carries the matching factor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import CompressionConfig
from .quantize import decompress
from .tensor import CompressedTensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
INT8_MAX = 127


@dataclass(frozen=True)
class QuantWeight:
    """Base of every quantised matrix: the tensor plumbing the executor needs, and dequantisation."""

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """The tensors of this weight by field name (None fields left out): the parts a tier stores."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    def with_tensors(self, tensors: dict[str, torch.Tensor]):
        """The same weight over other tensors of the same shapes (a GPU slot, a pinned copy)."""
        return dataclasses.replace(self, **tensors)

    def empty_like(self, device: torch.device | str):
        """Uninitialised tensors of the same shapes and dtypes on `device`: a staging slot to copy into."""
        return self.with_tensors({k: torch.empty(t.shape, dtype=t.dtype, device=device)
                                  for k, t in self.tensor_fields().items()})

    def to(self, device: torch.device | str, non_blocking: bool = False):
        return self.with_tensors({k: t.to(device, non_blocking=non_blocking)
                                  for k, t in self.tensor_fields().items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensor_fields().values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensor_fields().values())

    @property
    def shape(self) -> torch.Size:
        """[out_features, in_features] of the matrix this stands for."""
        raise NotImplementedError

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The matrix as the model would see it, W [N, K] in `dtype` (smoothing factor included: W / smooth
        over input channels equals what the smoothed activation meets)."""
        raise NotImplementedError

    def _unsmooth(self, w: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
        return w if smooth is None else w / smooth.to(w.dtype)


@dataclass(frozen=True)
class Fp8Weight(QuantWeight):
    """e4m3 weights with one float32 scale per output channel: W ~= weight * scale."""

    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N, 1]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.scale).to(dtype)


@dataclass(frozen=True)
class Int8Weight(QuantWeight):
    """Symmetric int8 weights, one float32 scale per output channel (W8A8: activations are quantised per
    token at run time). `smooth` [K] divides the activation first when SmoothQuant's factor could not be
    folded into a preceding norm."""

    weight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, 1]
    smooth: torch.Tensor | None = None  # float32 [K]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._unsmooth(self.weight.float() * self.scale, self.smooth).to(dtype)


@dataclass(frozen=True)
class Int4Weight(QuantWeight):
    """4-bit group-wise weights along the input dimension (round-to-nearest or AWQ), in the layout of
    `CompressedTensor` grouped along dim -1: W[n, g*G + j] ~= min[n, g] + q[n, g, j] * scale[n, g].

    Byte j of a group holds value j in its low nibble and value j + group_size/2 in its high nibble."""

    data: torch.Tensor  # uint8 [N, num_groups, group_size // 2]
    scale: torch.Tensor  # [N, num_groups, 1], the model's dtype (a stored checkpoint's: its own)
    min: torch.Tensor  # [N, num_groups, 1], the scale's dtype or float32
    in_features: int
    smooth: torch.Tensor | None = None  # float32 [K]

    @property
    def group_size(self) -> int:
        return self.data.shape[-1] * 2

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.in_features))

    @property
    def stored_dtype(self) -> torch.dtype:
        """The wider of the scale's and the min's dtypes (they differ for an AWQ checkpoint's weights)."""
        return torch.promote_types(self.scale.dtype, self.min.dtype)

    def packed(self, dtype: torch.dtype | None = None) -> CompressedTensor:
        """The same bytes as a `CompressedTensor` (for `decompress`), its scale and min in `dtype` (default:
        the wider of their stored dtypes)."""
        dtype = dtype or self.stored_dtype
        cfg = CompressionConfig(num_bits=4, group_size=self.group_size, group_dim=-1)
        return CompressedTensor(self.data, self.scale.to(dtype), self.min.to(dtype), self.shape, dtype, cfg)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # Rebuilt in the widest of the scale's, the min's and `dtype`: fp16 scales (a GGUF file's) asked for in
        # float32 or bfloat16 are computed in float32, where min + q * scale of an fp16 pair rounds once, as
        # llama.cpp's; an AWQ checkpoint's float32 min (-z * s, exact) keeps even an fp16 rebuild in float32.
        work = torch.promote_types(self.stored_dtype, dtype)
        return self._unsmooth(decompress(self.packed(work)), self.smooth).to(dtype)


@dataclass(frozen=True)
class Int8GroupWeight(QuantWeight):
    """Symmetric 8-bit weights in groups along the input dimension, weight-only:
    W[n, g*G + j] = weight[n, g, j] * scale[n, g].

    This is GGUF's Q8_0 (groups of 32, fp16 scales; see `ggml`). Unlike `Int8Weight` the activation is never
    rounded: the matmul rebuilds W in the activation's dtype, so a model keeps the outputs of its dequantised
    checkpoint while storing one byte per value."""

    weight: torch.Tensor  # int8 [N, num_groups, group_size]
    scale: torch.Tensor  # [N, num_groups, 1]

    @property
    def group_size(self) -> int:
        return self.weight.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.weight.shape[0], self.weight.shape[1] * self.weight.shape[2]))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # q * scale is exact in float32 for an fp16 scale (8 by 11 significant bits), so the one rounding is
        # the cast to `dtype`, as for the dequantised checkpoint
        work = torch.promote_types(self.scale.dtype, dtype)
        return (self.weight.to(work) * self.scale.to(work)).reshape(self.shape).to(dtype)  # [N, K]

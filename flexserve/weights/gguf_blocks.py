"""A GGUF matrix kept in its file's quantised blocks, with the row operations loading needs on them.

Why: under `--quantization gguf` a reader hands over a projection stored as Q4_0, Q4_1 or Q8_0 as its bytes,
not dequantised, so that `flexserve.compression.ggml` can turn it into a quantised weight with nothing rounded.
Every row of such a matrix is its own run of blocks, so the operations loading needs on whole rows work on the
bytes: concatenating matrices (fusion, `stored.cat_rows`) and permuting rows (llama.cpp's Q/K order). The
weights package may not import `compression` (one layer), so the bytes travel in this plain carrier until the
offload layer converts them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

# The GGML encodings kept as blocks; `flexserve.compression.ggml.KEPT_TYPES` converts the same ones.
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


@dataclass(frozen=True)
class GGUFBlocks:
    """The quantised blocks of one [rows, in_features] matrix as a GGUF file stores them."""

    type_name: str  # a GGML type of KEPT_TYPES
    blocks: torch.Tensor  # uint8 [rows, bytes per row]
    in_features: int

    @property
    def shape(self) -> torch.Size:
        """[out_features, in_features] of the matrix the blocks encode (what shape checks compare)."""
        return torch.Size((self.blocks.shape[0], self.in_features))

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "GGUFBlocks":
        """The matrix with its rows rearranged by `fn`, a function of a tensor's leading dimension only."""
        return replace(self, blocks=fn(self.blocks))

    def joined(self, parts: Sequence[object]) -> "GGUFBlocks | None":
        """`parts` (self first) stacked row-wise as blocks (for `stored.cat_rows`); None unless all are blocks
        of this encoding and width."""
        if not all(isinstance(p, GGUFBlocks) and p.type_name == self.type_name
                   and p.in_features == self.in_features for p in parts):
            return None
        return replace(self, blocks=torch.cat([p.blocks for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix, by `gguf.quants.dequantize` (what reading it dense gives)."""
        import gguf

        qtype = gguf.GGMLQuantizationType[self.type_name]
        data = np.asarray(gguf.quants.dequantize(self.blocks.numpy(), qtype), dtype=np.float32)
        return torch.from_numpy(data.reshape(tuple(self.shape)))


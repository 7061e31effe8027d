"""Quantisation: FlexGen's group-wise 4/8-bit compression of weights and KV cache (`quantize`, `tensor`), and
the weight quantisation schemes behind `--quantization` (`schemes`, `qweight`, `linear`, `smoothing`).

Names are resolved lazily so that `names` (the scheme names and their checks) loads without torch: the
command line's parser and `Policy` use it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"CompressionConfig": "config", "compress": "quantize", "compress_into": "quantize",
            "decompress": "quantize", "CompressedTensor": "tensor", "compressed_nbytes": "tensor"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

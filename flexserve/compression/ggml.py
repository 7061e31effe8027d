"""llama.cpp's Q4_0, Q4_1 and Q8_0 block encodings as flexserve quantised weights, without rounding anything.

Why: a GGUF file that stores its projections in these encodings is already quantised, and its blocks fit
flexserve's weight forms byte for byte. Keeping them (`--quantization gguf`) holds the model in memory at about
its file size, where dequantising at load would hold it at 16 or 32 bits per value.

A quantised [N, K] matrix is stored row by row, each row as K / 32 blocks of 32 values (d, m: float16):

| type | block (bytes) | value of q | flexserve form |
|---|---|---|---|
| Q4_0 | d (2), 16 bytes of nibbles | d * (q - 8) | `Int4Weight`, group 32: scale d, min -8d |
| Q4_1 | d (2), m (2), 16 bytes of nibbles | d * q + m | `Int4Weight`, group 32: scale d, min m |
| Q8_0 | d (2), 32 int8 | d * q | `Int8GroupWeight`, group 32: scale d |

Byte j of a 4-bit block holds value j in its low nibble and value j + 16 in its high one: `Int4Weight`'s own
order, so the nibbles are copied as they are. Scales stay float16 (Q4_0 gains its min: 5 bits per value in
memory against 4.5 in the file). Rebuilt in float32, every value equals `gguf.quants.dequantize`'s: d * q is
exact there (at most 8 by 11 significant bits), -8d too, and Q4_1's + m is the one rounding, made alike. The
only difference is a zero's sign: a Q4_0 value with q = 8 and a negative d is -0.0 in gguf and +0.0 here.

Other GGML encodings (the K-quants, IQ types, F16, ...) have no matching form; their readers dequantise them.
"""
from __future__ import annotations

import torch

from ..errors import ModelLoadError
from .qweight import Int4Weight, Int8GroupWeight, QuantWeight

BLOCK = 32  # values per block in all three encodings
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
KEPT_TYPES = tuple(_BLOCK_BYTES)  # the GGML type names this module converts
_FP16_MAX = torch.finfo(torch.float16).max


def ggml_weight(type_name: str, blocks: torch.Tensor, in_features: int) -> QuantWeight:
    """The flexserve weight holding a matrix's GGML blocks: `blocks` uint8 [N, K / 32 * block bytes], one row
    of the matrix per row, as the file stores them (module docstring)."""
    if type_name not in _BLOCK_BYTES:
        raise ModelLoadError(f"GGML type {type_name} has no quantized form here (kept: {', '.join(KEPT_TYPES)})")
    size = _BLOCK_BYTES[type_name]
    if in_features % BLOCK or blocks.dtype != torch.uint8 or blocks.dim() != 2 \
            or blocks.shape[1] != in_features // BLOCK * size:
        raise ModelLoadError(f"{type_name} blocks of shape {tuple(blocks.shape)} ({blocks.dtype}) do not hold "
                             f"rows of {in_features} values")
    b = blocks.reshape(blocks.shape[0], in_features // BLOCK, size)  # [N, G, block bytes]
    d = _fp16(b[..., 0:2])  # [N, G, 1]
    if type_name == "Q8_0":
        return Int8GroupWeight(b[..., 2:].contiguous().view(torch.int8), d)  # [N, G, 32] int8
    if type_name == "Q4_1":
        return Int4Weight(b[..., 4:].contiguous(), d, _fp16(b[..., 2:4]), in_features)
    low = d.float() * -8  # exact in float32; in float16 unless |d| > 8191.875 (then both stay float32)
    if bool((low.abs() <= _FP16_MAX).all()):
        return Int4Weight(b[..., 2:].contiguous(), d, low.half(), in_features)
    return Int4Weight(b[..., 2:].contiguous(), d.float(), low, in_features)


def _fp16(pairs: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from byte pairs [..., 2] -> [..., 1] (GGUF is little-endian, as are our hosts)."""
    return pairs.contiguous().view(torch.float16)

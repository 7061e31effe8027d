"""The weight quantisation schemes behind `--quantization`, and round-to-nearest quantisation of one matrix.

| scheme | weight | activation | calibration |
|---|---|---|---|
| `fp8` | e4m3, per-output-channel scale | e4m3, per-token scale (dynamic) | none |
| `int8` | int8, per-output-channel scale | int8, per-token scale (dynamic) | SmoothQuant factors |
| `rtn4` | 4-bit groups along K (asymmetric) | the model's dtype | none |
| `awq` | as `rtn4` | the model's dtype | AWQ's per-channel scale search |
| `gguf` | a GGUF file's own Q4_0/Q4_1 (4-bit, groups of 32) and Q8_0 (8-bit, groups of 32) blocks | the model's dtype | none: nothing is rounded (`ggml`) |
| `awq-checkpoint` | an AutoAWQ checkpoint's own 4-bit groups (its group size) | the model's dtype | none: nothing is rounded (`awq_checkpoint`) |

Smoothing and scale search live in `smoothing`; this module only rounds a given matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicyError
from .config import CompressionConfig
from .names import CALIBRATED_SCHEMES, DEFAULT_GROUP_SIZE, GROUPED_SCHEMES, STORED_SCHEMES, check_scheme
from .quantize import compress
from .qweight import FP8_DTYPE, FP8_MAX, INT8_MAX, Fp8Weight, Int4Weight, Int8Weight, QuantWeight

@dataclass(frozen=True)
class QuantConfig:
    """Which scheme quantises the decoder layers' projections, and its knobs.

    `group_size` is the 4-bit group along the input dimension (rtn4, awq); `smooth_alpha` is SmoothQuant's
    migration strength (0: all difficulty stays on the activations, 1: all moves to the weights);
    `awq_grid` the number of alpha values AWQ tries in [0, 1]; `calibration_tokens` how many tokens of the
    shipped calibration text the calibrated schemes run through the float model."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE
    smooth_alpha: float = 0.5
    awq_grid: int = 20
    calibration_tokens: int = 2048

    def __post_init__(self) -> None:
        check_scheme(self.scheme, self.group_size)
        if not 0 <= self.smooth_alpha <= 1:
            raise PolicyError(f"SmoothQuant alpha must be within 0..1, got {self.smooth_alpha}")
        if self.awq_grid < 1 or self.calibration_tokens < 1:
            raise PolicyError("the AWQ grid and the calibration token count must be positive")

    @property
    def is_calibrated(self) -> bool:
        return self.scheme in CALIBRATED_SCHEMES

    @property
    def is_stored(self) -> bool:
        """Whether the scheme keeps the checkpoint's own quantised weights instead of rounding float ones."""
        return self.scheme in STORED_SCHEMES


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    """e4m3 with a per-output-channel scale: each row's largest magnitude maps to e4m3's largest (448)."""
    scale = _row_absmax(w) / FP8_MAX  # [N, 1]
    q = (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(q, scale)


def quantize_int8(w: torch.Tensor, smooth: torch.Tensor | None = None) -> Int8Weight:
    """Symmetric int8 per output channel; `smooth` [K] is kept for the activation (see `Int8Weight`)."""
    scale = _row_absmax(w) / INT8_MAX  # [N, 1]
    q = (w.float() / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(q, scale, None if smooth is None else smooth.float())


def quantize_int4(w: torch.Tensor, group_size: int, smooth: torch.Tensor | None = None) -> Int4Weight:
    """Round-to-nearest 4-bit, asymmetric min/max per group of `group_size` input channels."""
    c = compress(w, CompressionConfig(num_bits=4, group_size=group_size, group_dim=-1))
    return Int4Weight(c.data, c.scale, c.min, w.shape[1], None if smooth is None else smooth.float())


def quantize(scheme: str, w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
             smooth: torch.Tensor | None = None) -> QuantWeight:
    """Quantise one [N, K] matrix by `scheme`; `smooth` is the activation divisor left over from smoothing
    (the caller has already multiplied it into `w`)."""
    if scheme == "fp8":
        return quantize_fp8(w)
    if scheme == "int8":
        return quantize_int8(w, smooth)
    if scheme in GROUPED_SCHEMES:
        return quantize_int4(w, group_size, smooth)
    if scheme in STORED_SCHEMES:  # a float matrix has no stored blocks to keep
        raise PolicyError(f"{scheme} keeps a checkpoint's quantized weights; it does not quantize a float matrix")
    raise PolicyError(f"unknown quantization scheme {scheme!r}")


def fake_quantize(scheme: str, w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """w rounded by `scheme` and back, in w's dtype: what a search compares candidate scales with."""
    return quantize(scheme, w, group_size).dequantize(w.dtype)


def _row_absmax(w: torch.Tensor) -> torch.Tensor:
    # a zero row gets a tiny scale, not zero: it quantises to zeros without dividing by zero
    return w.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min_(1e-12)


def calibration_text() -> str:
    """The fixed English text the calibrated schemes run through the float model (chapters 1-3 of Jane
    Austen's Pride and Prejudice, public domain; see data/README.md)."""
    from pathlib import Path

    return (Path(__file__).parent / "data" / "calibration.txt").read_text(encoding="utf-8")

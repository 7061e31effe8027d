"""AutoAWQ "GEMM" checkpoints (the Hub's `-AWQ` models): their `quantization_config`, and the 4-bit matrices
they store in place of dense projections.

Why: such a folder stores each quantised decoder projection X not as `X.weight` but as three tensors, and has
no dense copy to fall back to. A reader hands them over in this plain carrier (`AWQBlocks`) so that the offload
layer can make them a 4-bit weight holding exactly the checkpoint's values (`flexserve.compression.
awq_checkpoint`); the weights package may not import `compression` (one layer), so the format is read here and
flexserve's own packing is done there. Read dense (`dequantize`), they are rebuilt here in float32, exactly.

For a projection of K inputs and N outputs, groups of G inputs:

| tensor | dtype, shape | holds |
|---|---|---|
| `X.qweight` | int32 [K, N / 8] | the 4-bit levels q[k, n] |
| `X.qzeros` | int32 [K / G, N / 8] | the 4-bit zero points z[g, n], packed alike |
| `X.scales` | float16 [K / G, N] | the scales s[g, n] |

Nibble i (bits 4i..4i+3) of packed column c holds column 8c + ORDER[i]. The transposed weight is
W_T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]; `nn.Linear`'s weight is W = W_T.T, [N, K].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ModelLoadError

SCHEME = "awq-checkpoint"  # the `--quantization` name that keeps these weights (`compression.names`)
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble i -> column 8c + ORDER[i]
_UNORDER = [ORDER.index(j) for j in range(8)]  # column 8c + j -> nibble _UNORDER[j]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i sits at bits 4i..4i+3
SUFFIXES = ("qweight", "qzeros", "scales")  # the tensor names replacing `X.weight`


@dataclass(frozen=True)
class AWQFormat:
    """What a checkpoint's `quantization_config` says, once checked to be the one form read here."""

    group_size: int


def awq_format(config: dict, where: str) -> AWQFormat | None:
    """The AWQ format of a config.json's contents, None for a dense checkpoint. Every other quantisation (GPTQ,
    bitsandbytes, fp8, AWQ's GEMV/Marlin layouts or other bit widths) is refused: its tensors would otherwise be
    missed or misread."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "awq":
        raise ModelLoadError(f"{where} is quantized with quant_method {method!r}, which flexserve does not read: "
                             f"it loads dense checkpoints and AutoAWQ (quant_method 'awq') 4-bit GEMM ones")
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    version, zero_point = str(qc.get("version", "gemm")).lower(), qc.get("zero_point", True)
    problems = []
    if bits != 4:
        problems.append(f"bits {bits!r} (only 4)")
    if version != "gemm":
        problems.append(f"version {version!r} (only gemm)")
    if zero_point is not True:
        problems.append(f"zero_point {zero_point!r} (only true)")
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2:
        problems.append(f"group_size {group!r} (an even number of inputs >= 2)")
    if problems:
        raise ModelLoadError(f"{where}: this AWQ checkpoint's form is not read by flexserve: "
                             f"{'; '.join(problems)}")
    return AWQFormat(group)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed AWQ-style -> uint8 [R, 8C] in column order (module docstring)."""
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS) & 0xF  # [R, C, 8]: nibble i of each int32
    return nibbles[..., _UNORDER].reshape(packed.shape[0], -1).to(torch.uint8)  # [R, 8C]


@dataclass(frozen=True)
class AWQBlocks:
    """One projection as an AWQ checkpoint stores it (module docstring), its shapes checked at construction."""

    qweight: torch.Tensor  # int32 [K, N / 8]
    qzeros: torch.Tensor  # int32 [K / G, N / 8]
    scales: torch.Tensor  # float16 [K / G, N]
    group_size: int

    def __post_init__(self) -> None:
        k, n = self.qweight.shape[0] if self.qweight.dim() == 2 else -1, self.scales.shape[-1]
        groups = k // self.group_size if k > 0 else -1
        fine = (self.qweight.dtype == torch.int32 and self.qzeros.dtype == torch.int32
                and self.scales.dtype in (torch.float16, torch.bfloat16) and k > 0 and k % self.group_size == 0
                and n % 8 == 0 and tuple(self.qweight.shape) == (k, n // 8)
                and tuple(self.qzeros.shape) == (groups, n // 8) and tuple(self.scales.shape) == (groups, n))
        if not fine:
            raise ModelLoadError(
                f"AWQ tensors do not fit together with group size {self.group_size}: qweight "
                f"{tuple(self.qweight.shape)} {self.qweight.dtype}, qzeros {tuple(self.qzeros.shape)} "
                f"{self.qzeros.dtype}, scales {tuple(self.scales.shape)} {self.scales.dtype} (expected int32 "
                f"[K, N/8], int32 [K/G, N/8] and float16 [K/G, N])")

    @property
    def shape(self) -> torch.Size:
        """[out_features, in_features] of the `nn.Linear` weight (what shape checks compare)."""
        return torch.Size((self.scales.shape[1], self.qweight.shape[0]))

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.qzeros.nbytes + self.scales.nbytes

    def joined(self, parts: Sequence[object]) -> "AWQBlocks | None":
        """`parts` (self first) stacked along the output dimension, the packed columns, as fusion stacks rows;
        None unless all are AWQ blocks of one group size and input width."""
        if not all(isinstance(p, AWQBlocks) and p.group_size == self.group_size
                   and p.qweight.shape[0] == self.qweight.shape[0] for p in parts):
            return None
        return AWQBlocks(torch.cat([p.qweight for p in parts], 1), torch.cat([p.qzeros for p in parts], 1),
                         torch.cat([p.scales for p in parts], 1), self.group_size)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels uint8 [N, K], zero points uint8 [N, K / G], scales [N, K / G]): the matrix's numbers in
        `nn.Linear`'s orientation, for conversion."""
        return unpack(self.qweight).t(), unpack(self.qzeros).t(), self.scales.t()

    def dequantize(self) -> torch.Tensor:
        """The float32 `nn.Linear` weight [N, K]: (q - z) * s, exact (a 5-bit integer times a 16-bit float)."""
        q, z, s = self.unpacked()  # [N, K], [N, K/G], [N, K/G]
        g = self.group_size
        return (q.float() - z.float().repeat_interleave(g, dim=1)) * s.float().repeat_interleave(g, dim=1)

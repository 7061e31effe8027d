"""Row-wise concatenation (the fusion of q/k/v and gate/up) over dense tensors and the quantised matrices some
checkpoints store (`GGUFBlocks`, `AWQBlocks`).

Why: a reader may hand a projection over in its stored quantised form, to be kept with nothing rounded, and
fusion must keep such a form whenever the parts share one; one fused weight has one form, so any other mix is
dequantised first (re-rounding would change values).
"""
from __future__ import annotations

from typing import Sequence

import torch


def cat_rows(parts: Sequence[object]) -> object:
    """`torch.cat(parts)` along the output rows, for tensors and stored quantised matrices alike: stored parts
    that `first.joined(parts)` can stack stay stored; anything else becomes a dense float tensor."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    first = parts[0]
    joined = None if isinstance(first, torch.Tensor) else first.joined(parts)
    if joined is not None:
        return joined
    return torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts])

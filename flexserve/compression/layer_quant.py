"""Quantising one decoder layer's weight dict: which projections, and where smoothing scales are folded.

A decoder layer has four projections: `qkv` (input: attn_norm's output in a pre-norm model), `o` (input: the
attention output), `up` (input: mlp_norm's output) and `down` (input: the MLP activation). A smoothing scale
s of a projection's input is folded where the layer structure allows it, so that it costs nothing at run time:

- qkv, up in a pre-norm model: the norm's weight (and bias) divided by s;
- down, when the activation is positively homogeneous (SwiGLU's `silu(gate) * up` is linear in `up`; ReLU
  commutes with a positive scale): the rows of `up` (its `up` half when gated) divided by s;
- anywhere else (o, post-norm models, GELU MLPs): kept as the weight's `smooth`, a divide of the activation.

`down` is handled first, since folding its scale changes `up`'s weight rows (never `up`'s input). The
embedding, LM head and mixture-of-experts weights stay in the model's dtype.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .schemes import QuantConfig, quantize
from .smoothing import awq_clip, awq_scales, smoothquant_scales

PROJECTIONS = ("down", "qkv", "o", "up")  # down first: its fold rewrites up's rows
Stats = dict[str, torch.Tensor]  # projection -> its calibration inputs [T, K]


def quantize_layer(cfg: ModelConfig, w: dict[str, torch.Tensor], qcfg: QuantConfig,
                   inputs: Stats | None = None) -> dict:
    """A new weight dict with the layer's projections quantised by `qcfg` (norm weights rewritten where a
    smoothing scale folds into them). `inputs` are each projection's calibration inputs, needed by the
    calibrated schemes (int8, awq)."""
    if qcfg.is_calibrated and inputs is None:
        raise ValueError(f"{qcfg.scheme} needs calibration inputs for every projection")
    out = dict(w)
    for name in PROJECTIONS:
        key = f"{name}.weight"
        if key not in out or cfg.is_moe and name in ("up", "down"):
            continue
        weight = out[key]
        if not qcfg.is_calibrated:
            out[key] = quantize(qcfg.scheme, weight, qcfg.group_size)
            continue
        s = _scales(qcfg, inputs[name], weight).to(weight.dtype)  # [K]
        leftover = None if _fold(cfg, out, name, s) else s
        scaled = weight * s
        if qcfg.scheme == "awq":  # the clipping search, on the scaled weight and the inputs it will meet
            scaled = awq_clip(inputs[name].to(weight.device) / s, scaled, qcfg.group_size)
        out[key] = quantize(qcfg.scheme, scaled, qcfg.group_size, leftover)
    return out


def _scales(qcfg: QuantConfig, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.to(weight.device)
    if qcfg.scheme == "int8":
        return smoothquant_scales(x.abs().amax(dim=0), weight, qcfg.smooth_alpha)
    return awq_scales(x, weight, qcfg.group_size, qcfg.awq_grid)


def _fold(cfg: ModelConfig, w: dict, name: str, s: torch.Tensor) -> bool:
    """Divide the op producing `name`'s input by s, in place in `w`; False when no op can absorb it."""
    if name in ("qkv", "up") and cfg.pre_norm:
        norm = "attn_norm" if name == "qkv" else "mlp_norm"
        for part in ("weight", "bias"):
            key = f"{norm}.{part}"
            if w.get(key) is not None:
                w[key] = w[key] / s.to(w[key].dtype)
        return True
    if name == "down" and (cfg.gated_mlp or cfg.activation == "relu") and isinstance(w.get("up.weight"),
                                                                                     torch.Tensor):
        rows = w["up.weight"].shape[0]
        first = rows // 2 if cfg.gated_mlp else 0  # gated: [gate | up], only the up half is scaled
        divisor = torch.ones(rows, dtype=s.dtype, device=s.device)
        divisor[first:] = s
        w["up.weight"] = w["up.weight"] / divisor[:, None].to(w["up.weight"].dtype)
        if w.get("up.bias") is not None:
            w["up.bias"] = w["up.bias"] / divisor.to(w["up.bias"].dtype)
        return True
    return False

"""The contract every weight reader follows, and the one place where checkpoint parts become canonical weights.

A reader yields, per decoder layer and for the global tensors, a dict of *raw parts* with family-neutral names
(`q.weight`, `k.weight`, `gate.weight`, `fc1.weight`, ...). `fuse_layer` turns those into the canonical layer
weights the model math uses (`qkv.weight`, `up.weight`, ...), so that fusion lives in one place for every reader.
Readers are lazy: a layer's tensors are read only when asked for, so a large model streams straight into its
target storage instead of being materialised whole first. A projection may also arrive as the quantised blocks
its file stores (`GGUFBlocks` under `--quantization gguf`, `AWQBlocks` of an AWQ checkpoint); fusion keeps
those as they are stored.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError
from .stored import cat_rows

Tensors = dict[str, torch.Tensor]


class WeightSource(Protocol):
    """A lazily read checkpoint."""

    config: ModelConfig

    def global_parts(self) -> Tensors:
        """Embedding, positional embedding, final norm and LM head, with canonical global names."""
        ...

    def layer_parts(self, index: int) -> Tensors:
        """Raw parts of one decoder layer (see module docstring)."""
        ...


def fuse_layer(cfg: ModelConfig, parts: Tensors, index: int) -> Tensors:
    """Canonical weights of one layer from its raw parts: q/k/v and gate/up are concatenated row-wise
    (`cat_rows`: kept quantised blocks of one encoding stay blocks)."""
    def need(name: str) -> torch.Tensor:
        if name not in parts:
            raise ModelLoadError(f"layer {index}: tensor {name!r} is missing from the checkpoint")
        return parts[name]

    out: Tensors = {
        "attn_norm.weight": need("attn_norm.weight"),
        "qkv.weight": cat_rows([need("q.weight"), need("k.weight"), need("v.weight")]),
        "o.weight": need("o.weight"),
        "mlp_norm.weight": need("mlp_norm.weight"),
    }
    if cfg.qk_norm:
        out["q_norm.weight"], out["k_norm.weight"] = need("q_norm.weight"), need("k_norm.weight")
    if cfg.is_moe:
        out.update(_fuse_experts(cfg, need))
    else:
        out["down.weight"] = need("down.weight")
        out["up.weight"] = cat_rows([need("gate.weight"), need("up.weight")]) if cfg.gated_mlp else need("up.weight")
    if cfg.norm_bias:
        out["attn_norm.bias"] = need("attn_norm.bias")
        out["mlp_norm.bias"] = need("mlp_norm.bias")
    if cfg.qkv_bias:
        out["qkv.bias"] = torch.cat([need("q.bias"), need("k.bias"), need("v.bias")])
    if cfg.o_bias:
        out["o.bias"] = need("o.bias")
    if cfg.mlp_bias:
        out["up.bias"] = torch.cat([need("gate.bias"), need("up.bias")]) if cfg.gated_mlp else need("up.bias")
        out["down.bias"] = need("down.bias")
    check_shapes(out, cfg.layer_weight_shapes(), f"layer {index}")
    return out


def _fuse_experts(cfg: ModelConfig, need) -> Tensors:
    """The sparse MLP's canonical weights: the router, and per expert (the shared one too) gate and up fused
    row-wise as in the dense MLP, so that each expert is one `up` and one `down` matmul."""
    out: Tensors = {"router.weight": need("router.weight")}
    prefixes = [f"experts.{e}." for e in range(cfg.num_experts)]
    if cfg.shared_expert_intermediate_size:
        prefixes.append("shared.")
        out["shared_gate.weight"] = need("shared_gate.weight").reshape(1, -1)  # GGUF stores it as a vector
    for p in prefixes:
        out[f"{p}up.weight"] = torch.cat([need(f"{p}gate.weight"), need(f"{p}up.weight")])
        out[f"{p}down.weight"] = need(f"{p}down.weight")
    return out


def check_shapes(tensors: Tensors, expected: dict[str, tuple[int, ...]], where: str) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelLoadError(f"{where}: tensor {name!r} is missing from the checkpoint")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ModelLoadError(
                f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the config implies {shape}")


def finish_globals(cfg: ModelConfig, parts: Tensors) -> Tensors:
    """Validate the global tensors; tied embeddings need no separate LM head."""
    if not cfg.tie_word_embeddings and "lm_head.weight" not in parts:
        raise ModelLoadError("the checkpoint has no LM head and the config does not tie embeddings")
    parts = {k: v for k, v in parts.items() if k in cfg.global_weight_shapes()}
    check_shapes(parts, cfg.global_weight_shapes(), "global weights")
    return parts

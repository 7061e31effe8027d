"""The layer math shared by every family: norms, rotary embedding, attention projections, MLP.

Functions take weights as a plain dict of tensors already on the compute device, so the same math serves the
resident runner, the offloading executor (which streams the dict in) and the paged serving runner. Attention
itself is delegated to an `attend(q, k, v)` callable supplied by the caller: it owns the KV cache (dense,
paged, on the GPU or on the CPU), so cache layout never leaks into the model code.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels.fused import rms_norm, rope, silu_mul
from ..errors import ModelLoadError
from .linear import linear
from .moe import moe_mlp

Weights = Mapping[str, torch.Tensor]
# attend(q: [B, S, H, hd], k: [B, S, Hkv, hd], v: [B, S, Hkv, hd]) -> [B, S, H * hd]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def apply_norm(cfg: ModelConfig, x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    weight = w[f"{prefix}.weight"]
    if cfg.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, w.get(f"{prefix}.bias"), cfg.norm_eps)
    return rms_norm(x, weight, cfg.norm_eps)  # in fp32, then back to the activation dtype (one kernel on a GPU)


def _activation(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    if cfg.activation == "relu":
        return F.relu(x)
    if cfg.activation == "gelu":
        return F.gelu(x)
    return F.silu(x)


# --- rotary embedding ----------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [hd/2], with linear or llama3-style scaling when the config asks for it, then divided
    by per-frequency factors where the config carries them (`freq_factors`: how GGUF files store Llama 3.1's
    scaling)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        inv = _llama3_inv_freq(inv, sc)
    elif kind not in ("default", None) or "factor" in sc:
        raise ModelLoadError(f"rope scaling {kind!r} is not supported (default, linear and llama3 are)")
    if sc.get("freq_factors") is not None:
        inv = inv / torch.tensor(sc["freq_factors"], dtype=torch.float32)
    return inv


def _llama3_inv_freq(inv: torch.Tensor, sc: dict) -> torch.Tensor:
    """llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_len = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # positions: [B, S] -> cos, sin: [B, S, 1, hd]
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, H, hd] at the positions cos, sin [B, S, 1, hd] were made for."""
    return rope(x, cos, sin)


# --- the decoder layer ---------------------------------------------------------------------------------------
def decoder_layer(cfg: ModelConfig, w: Weights, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None,
                  attend: AttendFn, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One pre- or post-norm decoder layer. x: [B, S, D] -> [B, S, D]. `reduce`: see `attention_out`."""
    return attention_out(cfg, w, x, attend(*attention_in(cfg, w, x, rope)), reduce=reduce)


def attention_in(cfg: ModelConfig, w: Weights, x: torch.Tensor,
                 rope: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a layer: norm, q/k/v projection and rotary embedding -> q [B,S,H,hd], k/v [B,S,Hkv,hd].

    Split from `attention_out` so that an executor can run the halves of several batches around attention
    that happens elsewhere (CPU attention overlaps the next batch's projections this way)."""
    b, s, _ = x.shape
    h = apply_norm(cfg, x, w, "attn_norm") if cfg.pre_norm else x
    qkv = linear(h, w["qkv.weight"], w.get("qkv.bias"))  # [B, S, (H + 2 Hkv) hd]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(b, s, cfg.num_heads, cfg.head_dim)
    k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # Qwen3: each head's q and k normed over head_dim, before the rotary embedding
        q, k = rms_norm(q, w["q_norm.weight"], cfg.norm_eps), rms_norm(k, w["k_norm.weight"], cfg.norm_eps)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k, v


def attention_out(cfg: ModelConfig, w: Weights, x: torch.Tensor, attn: torch.Tensor,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Second half: output projection and residual, then the MLP block. attn: [B, S, H * hd].

    `reduce` (tensor parallelism) sums the partial outputs of the row-parallel o and down projections across
    ranks before each residual add; their biases are added once, after the sum."""
    x = x + _row_linear(attn, w["o.weight"], w.get("o.bias"), reduce)
    if not cfg.pre_norm:
        x = apply_norm(cfg, x, w, "attn_norm")
    h = apply_norm(cfg, x, w, "mlp_norm") if cfg.pre_norm else x
    if cfg.is_moe:  # a mixture of experts in place of the dense MLP
        if reduce is not None:
            raise ModelLoadError("tensor parallelism does not split mixtures of experts")
        return x + moe_mlp(cfg, w, h)
    u = linear(h, w["up.weight"], w.get("up.bias"))
    if cfg.gated_mlp:
        u = silu_mul(u)  # silu(gate) * up
    else:
        u = _activation(cfg, u)
    x = x + _row_linear(u, w["down.weight"], w.get("down.bias"), reduce)
    if not cfg.pre_norm:
        x = apply_norm(cfg, x, w, "mlp_norm")
    return x


def _row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    if reduce is None:
        return linear(x, weight, bias)
    y = reduce(linear(x, weight))  # partial sums over this rank's input features -> the full output
    return y if bias is None else y + bias


def embed(cfg: ModelConfig, w: Weights, ids: torch.Tensor, positions: torch.Tensor,
          token_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Token (and learned positional) embedding. ids, positions: [B, S] -> [B, S, D].

    `token_rows` are the already looked-up token embeddings (the executor gathers them where the table lives).
    """
    x = F.embedding(ids, w["embed.weight"]) if token_rows is None else token_rows
    if "project_in.weight" in w:
        x = linear(x, w["project_in.weight"])
    if cfg.positional == "learned":
        x = x + F.embedding(positions + cfg.learned_pos_offset, w["pos_embed.weight"])
    return x


def lm_head(cfg: ModelConfig, w: Weights, x: torch.Tensor) -> torch.Tensor:
    """Final norm and output projection. x: [..., D] -> logits [..., V]."""
    if cfg.pre_norm:
        x = apply_norm(cfg, x, w, "final_norm")
    if "project_out.weight" in w:
        x = linear(x, w["project_out.weight"])
    return linear(x, w["lm_head.weight"] if "lm_head.weight" in w else w["embed.weight"])

"""Attention over a dense, left-padded KV cache (offline generation and the offloading executor).

The cache of one layer for one batch is a pair of tensors [S_max, B, Hkv, hd], sequence-major as in FlexGen, so
that the keys of a range of positions are one contiguous byte range: a decode step appends one contiguous slice,
and a cache on disk or in host memory moves as a single read or write. A cache that CPU attention reads in
place is head-major instead, [B, Hkv, S_max, hd] (`seq_dim=2`): the CPU kernels read it about 3x faster. New keys/values go to [start, start + S). Left padding is described by a key-validity mask; a padded query row is allowed
to see itself so that no softmax row is empty (an empty row gives NaN, and 0 * NaN would leak into real rows).
The same function runs on the GPU or on the CPU (FlexGen's CPU attention): the caller decides where the
tensors are.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..compression.kv import from_cache, to_cache

# cuDNN's SDPA builds an execution plan per new shape on the host (~2 ms each); a decode step changes the key
# length every call, so that cost lands on every layer of every step. Flash / memory-efficient kernels do not.
_GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttnMeta:
    """Per-forward facts shared by every layer of one batch."""

    start: int  # cache index of the first new token
    num_new: int  # new tokens this forward (prompt length at prefill, 1 at decode)
    key_valid: torch.Tensor | None  # [B, start + num_new] bool; None when nothing is padded
    _masks: dict = field(default_factory=dict)

    def mask(self, device: torch.device) -> torch.Tensor | None:
        """Boolean mask [B, 1, S, L] (True = attend) on `device`, or None for the unpadded case."""
        if self.key_valid is None:
            return None
        if device not in self._masks:
            total = self.start + self.num_new
            valid = self.key_valid.to(device)
            q_pos = torch.arange(self.start, total, device=device)[:, None]  # [S, 1]
            k_pos = torch.arange(total, device=device)[None, :]  # [1, L]
            causal = k_pos <= q_pos
            mask = (causal[None] & valid[:, None, :]) | (k_pos == q_pos)[None]
            self._masks[device] = mask[:, None]
        return self._masks[device]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttnMeta, seq_dim: int = 0) -> torch.Tensor:
    """Write k/v into the cache and attend. q: [B, S, H, hd]; k, v: [B, S, Hkv, hd] -> [B, S, H * hd]."""
    b, s, h, hd = q.shape
    end = meta.start + s
    k, v = to_cache(k, k_cache.dtype), to_cache(v, v_cache.dtype)  # an fp8 cache: saturated e4m3
    if seq_dim == 0:  # [S, B, Hkv, hd]
        k_cache[meta.start:end] = k.transpose(0, 1)
        v_cache[meta.start:end] = v.transpose(0, 1)
        keys, values = k_cache[:end].permute(1, 2, 0, 3), v_cache[:end].permute(1, 2, 0, 3)  # [B, Hkv, L, hd]
    else:  # [B, Hkv, S, hd]: what CPU attention reads fastest (each head's keys contiguous)
        k_cache[:, :, meta.start:end] = k.transpose(1, 2)
        v_cache[:, :, meta.start:end] = v.transpose(1, 2)
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    keys, values = from_cache(keys, q.dtype), from_cache(values, q.dtype)  # an fp8 cache is read upcast
    mask = meta.mask(q.device)
    causal = mask is None and s > 1 and meta.start == 0
    if mask is None and s > 1 and meta.start > 0:  # chunk after a prefix, no padding: explicit causal mask
        mask = causal_mask(meta.start, s, q.device)
    return attend_over(q, keys, values, mask, causal)


def dense_attend(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, seq_dim: int = 0):
    """The attend(q, k, v) callable of `decoder_layer` over one layer's dense cache (see `dense_attention`)."""
    return lambda q, k, v: dense_attention(q, k, v, k_cache, v_cache, meta, seq_dim)


def causal_mask(start: int, num_new: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, start + S] bool: query i (at position start + i) sees keys 0 .. start + i."""
    q_pos = torch.arange(start, start + num_new, device=device)[:, None]
    return (torch.arange(start + num_new, device=device)[None, :] <= q_pos)[None, None]


def attend_over(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention of q [B, S, H, hd] over keys/values [B, Hkv, L, hd] -> [B, S, H * hd]."""
    b, s, h, hd = q.shape
    with sdpa_kernel(_GPU_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=h != keys.shape[1])  # [B, H, S, hd]
    return out.transpose(1, 2).reshape(b, s, h * hd)

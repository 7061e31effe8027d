"""Paged attention on the GPU: one Triton kernel for decode tokens and prompt-chunk tokens alike.

Each query row (a token computed this step) attends to the first `ctx_len` positions of its sequence, whose
keys and values sit in the pool at slots `table[p // block_size] * block_size + p % block_size`. A decode
token's `ctx_len` is its position + 1; a prompt-chunk token's is the same, which is exactly the causal mask,
so one launch covers the whole flattened batch of a step.

Why a kernel: the portable path (`flexserve.engine.paged_batch`) gathers every sequence's keys into a dense
tensor and then runs SDPA, so each layer reads the context three times (gather read, gather write, SDPA read)
and pads every sequence to the longest. This kernel walks the block table itself and reads each key and value
once, with an online softmax in fp32 (FlashAttention's recurrence).

Program (row, kv_head): the GROUP = H / Hkv query heads that share a KV head are one tile (padded to 16 rows,
the smallest `tl.dot`), so a GQA model reads its cache once per KV head, not once per query head. The CPU
path computes the same function; `tests/engine/test_paged_kernel.py` compares the two on the device.
"""
from __future__ import annotations

import os

import torch

try:  # the CPU wheel of torch has no Triton; the engine then uses the gather path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def kernel_supports(device: torch.device, head_dim: int) -> bool:
    """True when the Triton kernel can run: CUDA, Triton present, power-of-two head size >= 16.

    FLEXSERVE_PAGED_ATTENTION=gather forces the portable path (for A/B benchmarks)."""
    if triton is None or device.type != "cuda" or os.environ.get("FLEXSERVE_PAGED_ATTENTION") == "gather":
        return False
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def kernel_available(q: torch.Tensor) -> bool:
    """`kernel_supports` for this query tensor."""
    return kernel_supports(q.device, q.shape[-1])


if triton is not None:
    @triton.jit
    def _paged_attention_kernel(Q, K, V, O, Tables, RowSeq, CtxLens, scale,
                                stride_qt, stride_qh, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
                                GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        seq = tl.load(RowSeq + row).to(tl.int64)
        ctx = tl.load(CtxLens + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        live = g < GROUP
        q = tl.load(Q + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=live[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        n = tl.arange(0, BLOCK_N)
        table = Tables + seq * stride_tb
        for start in range(0, ctx, BLOCK_N):
            pos = start + n
            valid = pos < ctx
            block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            offs = (block * BLOCK_SIZE + pos % BLOCK_SIZE)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            k = tl.load(K + offs, mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offs, mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=live[:, None])


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, ctx_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """q [T, H, hd]; pools [slots, Hkv, hd]; block_tables [R, max_blocks] int32; row_seq, ctx_lens [T] int32.

    Returns [T, H, hd]: row t attends to positions [0, ctx_lens[t]) of sequence row_seq[t]."""
    t, h, hd = q.shape
    hkv = k_pool.shape[1]
    group = h // hkv
    out = torch.empty_like(q)
    if t == 0:
        return out
    block_n = 64 if hd <= 128 else 32
    _paged_attention_kernel[(t, hkv)](
        q, k_pool, v_pool, out, block_tables, row_seq, ctx_lens, hd ** -0.5,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out

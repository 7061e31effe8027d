"""Paged attention on the GPU: FlashAttention's recurrence over block tables, query-tiled, for a whole step.

A serving step flattens decode tokens (one per running sequence) and prompt chunks into rows. Row t attends to
the first `ctx_lens[t]` positions of its sequence, whose keys and values sit in the pool at slots
`table[p // block_size] * block_size + p % block_size`; inside a chunk that is exactly the causal mask.

One kernel, launched twice per layer:

- Prompt chunks run as query tiles: a program owns BLOCK_Q consecutive tokens of one chunk and one KV head,
  and its BLOCK_M = BLOCK_Q x GROUP rows (token-major, the GROUP query heads that share the KV head inside)
  share every K/V tile it reads. A chunk's keys are read once per tile instead of once per token, so prefill
  attention is bound by tensor-core math, not by re-reading the context; keys every row of the tile sees skip
  the causal mask. Tiles are ordered longest context first, so the long ones do not start last.
- Decode rows are tiles of one token (BLOCK_M = GROUP padded to the 16 rows of the smallest `tl.dot`, so a GQA
  model reads each KV head once for all its query heads). When the decode batch is too small to fill the GPU
  and contexts are long, the context is split across programs (flash-decoding): each writes an unnormalised
  partial output with its running max and sum, and `_merge_splits` combines them. The split count depends
  only on shapes (batch size, table width), never on values, so a captured CUDA graph stays valid.

The portable path (`flexserve.engine.paged_batch`) computes the same function on any device; the GPU test
compares the two.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

try:  # the CPU wheel of torch has no Triton; the engine then uses the gather path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_LOG2E = 1.4426950408889634


def kernel_supports(device: torch.device, head_dim: int) -> bool:
    """True when the Triton kernel can run: CUDA, Triton present, power-of-two head size >= 16.

    FLEXSERVE_PAGED_ATTENTION=gather forces the portable path (for A/B benchmarks)."""
    if triton is None or device.type != "cuda" or os.environ.get("FLEXSERVE_PAGED_ATTENTION") == "gather":
        return False
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def kernel_available(q: torch.Tensor) -> bool:
    """`kernel_supports` for this query tensor."""
    return kernel_supports(q.device, q.shape[-1])


def prefill_block_m(dtype: torch.dtype) -> int:
    """Query rows (tokens x the heads of a KV group) per prompt-chunk program: 128 for 16-bit inputs; 64 for
    float32, whose tiles take twice the shared memory."""
    return 64 if dtype == torch.float32 else 128


def tokens_per_tile(group: int, dtype: torch.dtype) -> int:
    """Prompt tokens a prefill program covers: as many whole KV groups as fit in its rows."""
    return max(1, prefill_block_m(dtype) // group)


@dataclass
class QueryTiles:
    """Prompt-chunk tiles of one step, shared by every layer: a device int32 tensor [4, num_tiles] of (block-table
    row, first flattened row, number of tokens, position of the first token)."""

    meta: torch.Tensor
    block_m: int
    block_q: int

    @property
    def num_tiles(self) -> int:
        return self.meta.shape[1]


def query_tiles(chunks: list[tuple[int, int, int, int]], group: int, dtype: torch.dtype,
                device: torch.device) -> QueryTiles:
    """Cut each chunk (flattened offset, tokens, first position, table row) into tiles of `tokens_per_tile`
    tokens, longest context first (the last tiles of long chunks are the heaviest programs)."""
    block_q = tokens_per_tile(group, dtype)
    rows = []
    for offset, n, start, table_row in chunks:
        for i in range(0, n, block_q):
            rows.append((table_row, offset + i, min(block_q, n - i), start + i))
    arr = np.array(rows, dtype=np.int32).reshape(-1, 4)
    arr = arr[np.argsort(-(arr[:, 3] + arr[:, 2]), kind="stable")]
    meta = torch.as_tensor(np.ascontiguousarray(arr.T))  # page-locked: a pageable upload waits for the stream
    meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta.to(device)
    return QueryTiles(meta, prefill_block_m(dtype), block_q)


if triton is not None:
    @triton.jit
    def _attend_tile(q, acc, m_i, l_i, K, V, table, kv_off, start, qpos, key_lo, key_hi, window, qk_scale,
                     stride_ks, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     MASKED: tl.constexpr, WINDOWED: tl.constexpr, IEEE: tl.constexpr):
        """One K/V tile [start, start + BLOCK_N) of the online softmax (log2 domain), over keys in
        [key_lo, key_hi). MASKED: row i sees keys <= qpos[i]; WINDOWED: and only the last `window` of them."""
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, HEAD_DIM)
        pos = start + n
        in_range = (pos >= key_lo) & (pos < key_hi)
        block = tl.load(table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        offs = (block * BLOCK_SIZE + pos % BLOCK_SIZE)[:, None] * stride_ks + kv_off + d[None, :]
        k = tl.load(K + offs, mask=in_range[:, None], other=0.0).to(q.dtype)  # an fp8 pool is upcast here
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            seen = (pos[None, :] <= qpos[:, None]) & in_range[None, :]
            if WINDOWED:
                seen = seen & (qpos[:, None] - pos[None, :] < window)
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs, mask=in_range[:, None], other=0.0).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    # Runtime sizes must not specialise the kernel: Triton compiles a variant per "divisible by 16 / equal to 1"
    # pattern of each integer argument, and a new variant in the middle of serving stalls a step for a second.
    # The block-table width (`stride_tb`) follows the step's longest context. Pointers are specialised on 16-byte
    # alignment: the step's metadata arrives in aligned parts (`memory.pinned.upload_parts`).
    @triton.jit(do_not_specialize=["num_tiles", "split_len", "sinks", "window", "stride_tb"])
    def _paged_attention_kernel(Q, QSink, K, V, O, Tables, RowSeq, CtxLens, Tiles, num_tiles, PartO, PartML,
                                qk_scale, stride_qt, stride_qh, stride_ks, stride_kh, stride_tb, stride_ot,
                                stride_oh, split_len, sinks, window,
                                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                                DECODE: tl.constexpr, SPLIT: tl.constexpr, STREAM: tl.constexpr,
                                IEEE: tl.constexpr):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if DECODE:  # one row per tile: the row's own table row and context length
            seq = tl.load(RowSeq + tile).to(tl.int64)
            first_row = tile
            num_rows = 1
            pos0 = tl.load(CtxLens + tile) - 1
        else:
            seq = tl.load(Tiles + tile).to(tl.int64)
            first_row = tl.load(Tiles + num_tiles + tile)
            num_rows = tl.load(Tiles + 2 * num_tiles + tile)
            pos0 = tl.load(Tiles + 3 * num_tiles + tile)
        r = tl.arange(0, BLOCK_M)
        tok = r // GROUP
        heads = kvh * GROUP + r % GROUP
        live = (tok < num_rows) & (r < BLOCK_Q * GROUP)
        d = tl.arange(0, HEAD_DIM)
        rows = (first_row + tok).to(tl.int64)
        q = tl.load(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=live[:, None], other=0.0)
        qpos = pos0 + tok  # position of each row's token: it sees keys [0, qpos]
        kv_end = pos0 + num_rows
        lo = split * split_len
        hi = tl.minimum(kv_end, lo + split_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table = Tables + seq * stride_tb
        kv_off = kvh * stride_kh
        if STREAM:  # attention sinks (seen through QSink, see `streaming_query`) and a sliding window
            q_sink = tl.load(QSink + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                             mask=live[:, None], other=0.0)
            sink_end = tl.minimum(sinks, kv_end)
            for start in range(0, sink_end, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q_sink, acc, m_i, l_i, K, V, table, kv_off, start, qpos, 0, sink_end,
                                             window, qk_scale, stride_ks, BLOCK_SIZE, BLOCK_N, HEAD_DIM, True,
                                             False, IEEE)
            win_lo = tl.maximum(sinks, pos0 - window + 1)
            for start in range(win_lo // BLOCK_N * BLOCK_N, kv_end, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, K, V, table, kv_off, start, qpos, win_lo, kv_end,
                                             window, qk_scale, stride_ks, BLOCK_SIZE, BLOCK_N, HEAD_DIM, True,
                                             True, IEEE)
        else:
            # Keys before the tile's first token are visible to every row: no mask. The rest is the diagonal.
            full_end = tl.maximum(lo, tl.minimum(hi, lo + (pos0 + 1 - lo) // BLOCK_N * BLOCK_N))
            for start in range(lo, full_end, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, K, V, table, kv_off, start, qpos, lo, hi, 0,
                                             qk_scale, stride_ks, BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, False,
                                             IEEE)
            for start in range(full_end, hi, BLOCK_N):
                acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, K, V, table, kv_off, start, qpos, lo, hi, 0,
                                             qk_scale, stride_ks, BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, False,
                                             IEEE)
        if SPLIT:  # unnormalised partial output plus (max, sum) for `_merge_splits`
            part = (split * tl.num_programs(0) + tile).to(tl.int64)
            width = tl.num_programs(1) * GROUP
            tl.store(PartO + (part * width + heads[:, None]) * HEAD_DIM + d[None, :], acc, mask=live[:, None])
            tl.store(PartML + (part * width + heads) * 2, m_i, mask=live)
            tl.store(PartML + (part * width + heads) * 2 + 1, l_i, mask=live)
        else:
            out = acc / l_i[:, None]
            tl.store(O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(O.dtype.element_ty), mask=live[:, None])


PREFILL_LAUNCH = {"block_n": 32, "num_warps": 8, "num_stages": 2}  # bf16/fp16, head size <= 128: best of a sweep on an H200


def prefill_launch(head_dim: int, ieee: bool) -> dict:
    """Key-tile width, warps and pipeline depth of a prompt-chunk launch. float32 and large heads take
    narrower key tiles to stay within shared memory."""
    if ieee or head_dim > 128:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": PREFILL_LAUNCH["block_n"], "num_warps": PREFILL_LAUNCH["num_warps"],
            "num_stages": PREFILL_LAUNCH["num_stages"]}


def _merge_splits(part_o: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor) -> None:
    """Combine split-context partials: part_o [S, T, H, hd] (unnormalised), part_ml [S, T, H, 2] -> out [T, H, hd].

    log2-domain maxima, as the kernel keeps them; an empty split has max -inf and sum 0 and weighs nothing."""
    m, l_sum = part_ml[..., 0], part_ml[..., 1]  # [S, T, H]
    m_all = m.amax(0, keepdim=True)
    w = torch.exp2(m - m_all)  # [S, T, H]
    num = (w[..., None] * part_o).sum(0)
    out.copy_(num / (w * l_sum).sum(0)[..., None])


def _num_splits(rows: int, num_kv_heads: int, max_ctx: int, device: torch.device) -> int:
    """Context splits for a decode launch: enough programs to fill the GPU twice over, each split at least 512
    keys. From shapes only (CUDA-graph safe)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = rows * num_kv_heads
    if programs >= sms or max_ctx < 1024:
        return 1
    return int(max(1, min(-(-2 * sms // programs), max_ctx // 512, 32)))


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, ctx_lens: torch.Tensor, block_size: int, num_decode: int | None = None,
                    tiles: QueryTiles | None = None, window: int = 0, sinks: int = 0,
                    q_sink: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, hd]; pools [slots, Hkv, hd]; block_tables [R, max_blocks] int32; row_seq, ctx_lens [T] int32.

    Rows [0, num_decode) are single-token rows; the rest are the prompt chunks described by `tiles` (from
    `query_tiles`). With no `num_decode`, every row is treated as a single-token row, which is correct for any
    rows, only slower for chunks. Returns [T, H, hd]: row t attends to positions [0, ctx_lens[t]) of sequence
    row_seq[t]. With a `window` (StreamingLLM), row t at position p sees only keys [0, sinks), scored with
    `q_sink` [T, H, hd], and keys (p - window, p], scored with `q`."""
    t, h, hd = q.shape
    hkv = k_pool.shape[1]
    group = h // hkv
    stream = window > 0
    if stream:  # both queries are read with one set of strides
        q = q.contiguous()
        q_sink = (q if q_sink is None else q_sink).contiguous()
    else:
        q_sink = q
    out = torch.empty_like(q)
    if t == 0:
        return out
    nd = t if num_decode is None else num_decode
    ieee = q.dtype == torch.float32
    common = dict(GROUP=group, HEAD_DIM=hd, BLOCK_SIZE=block_size, IEEE=ieee, STREAM=stream)
    args = (q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1))
    scale = hd ** -0.5 * _LOG2E
    if nd:
        block_m = max(16, triton.next_power_of_2(group))
        block_n = 64 if hd <= 128 else 32
        max_ctx = block_tables.shape[1] * block_size
        splits = 1 if stream else _num_splits(nd, hkv, max_ctx, q.device)
        split_len = -(-max_ctx // (splits * block_n)) * block_n
        part_o = part_ml = out
        if splits > 1:
            part_o = torch.empty((splits, nd, h, hd), dtype=torch.float32, device=q.device)
            part_ml = torch.empty((splits, nd, h, 2), dtype=torch.float32, device=q.device)
        _paged_attention_kernel[(nd, hkv, splits)](
            q, q_sink, k_pool, v_pool, out, block_tables, row_seq, ctx_lens, row_seq, nd, part_o, part_ml, scale,
            *args, split_len, sinks, window, BLOCK_M=block_m, BLOCK_Q=1, BLOCK_N=block_n, DECODE=True,
            SPLIT=splits > 1, num_warps=4, num_stages=2, **common)
        if splits > 1:
            _merge_splits(part_o, part_ml, out[:nd])
    if nd < t:
        if tiles is None:
            raise ValueError("prompt-chunk rows need their query tiles (query_tiles)")
        launch = prefill_launch(hd, ieee)
        _paged_attention_kernel[(tiles.num_tiles, hkv, 1)](
            q, q_sink, k_pool, v_pool, out, block_tables, row_seq, ctx_lens, tiles.meta, tiles.num_tiles, out, out,
            scale, *args, 1 << 30, sinks, window, BLOCK_M=tiles.block_m, BLOCK_Q=tiles.block_q, DECODE=False,
            SPLIT=False, **launch, **common)
    return out

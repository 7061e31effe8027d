"""The paged-attention kernel's launch plan (CPU) and the kernel itself against the portable path (GPU).

The query tiles must cover every prompt-chunk row exactly once, and the kernel (query-tiled prefill, per-row
decode, split-context decode) must equal the gather path, which the engine tests hold to a per-row reference.
The GPU cases run on the GPU machine (CI has none); they are the record that the two paths agree."""
import random

import pytest
import torch

from flexserve.engine.paged_batch import PagedBatch, SeqChunk, _gather_attend
from flexserve.kernels.paged_attention import _merge_splits, query_tiles, tokens_per_tile


@pytest.mark.parametrize("group, dtype", [(1, torch.bfloat16), (3, torch.float16), (4, torch.float32),
                                          (8, torch.bfloat16)])
def test_query_tiles_cover_every_chunk_row_once(group, dtype):
    chunks = [(5, 300, 0, 2), (305, 17, 40, 3), (322, 1, 0, 4), (323, 129, 900, 5)]
    tiles = query_tiles(chunks, group, dtype, torch.device("cpu"))
    table_row, first, count, pos0 = tiles.meta.tolist()
    assert tiles.block_q == tokens_per_tile(group, dtype) and tiles.block_q * group <= tiles.block_m
    covered = {}
    for r, f, n, p in zip(table_row, first, count, pos0):
        assert 1 <= n <= tiles.block_q
        for j in range(n):
            assert f + j not in covered
            covered[f + j] = (r, p + j)
    want = {off + j: (row, start + j) for off, n, start, row in chunks for j in range(n)}
    assert covered == want  # every chunk row once, with its own table row and position
    ends = [p + n for p, n in zip(pos0, count)]
    assert ends == sorted(ends, reverse=True)  # longest context first


def test_merge_splits_equals_one_softmax():
    """Partials over disjoint key ranges (an empty one among them) merge into the softmax over all keys."""
    torch.manual_seed(0)
    t, h, hd, n = 3, 2, 8, 40
    q, k, v = torch.randn(t, h, hd), torch.randn(n, h, hd), torch.randn(n, h, hd)
    s = torch.einsum("thd,nhd->thn", q, k) * 1.4426950408889634  # log2 domain, as the kernel
    want = torch.einsum("thn,nhd->thd", torch.softmax(s / 1.4426950408889634, -1), v)
    bounds = [(0, 15), (15, 15), (15, 40)]
    part_o, part_ml = torch.zeros(3, t, h, hd), torch.zeros(3, t, h, 2)
    for i, (lo, hi) in enumerate(bounds):
        if lo == hi:
            part_ml[i, ..., 0] = float("-inf")
            continue
        m = s[..., lo:hi].amax(-1)
        p = torch.exp2(s[..., lo:hi] - m[..., None])
        part_o[i] = torch.einsum("thn,nhd->thd", p, v[lo:hi])
        part_ml[i, ..., 0], part_ml[i, ..., 1] = m, p.sum(-1)
    out = torch.empty(t, h, hd)
    _merge_splits(part_o, part_ml, out)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def _long_scenario(block: int, num_blocks: int, spec, seed: int):
    """Sequences (start, n) with scattered block tables over a pool of `num_blocks` blocks."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for start, n in spec:
        table = [free.pop() for _ in range(-(-(start + n) // block))]
        seqs.append(SeqChunk([rng.randrange(50) for _ in range(n)], start, table, True))
    return seqs


MIXED = [(700, 1), (0, 1), (2999, 1), (0, 300), (517, 129), (64, 1), (1000, 77)]
DECODE_FEW_LONG = [(3000, 1), (4090, 1), (5, 1)]  # few rows, long tables: the split-context launch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("spec", [MIXED, DECODE_FEW_LONG], ids=["mixed", "split-decode"])
@pytest.mark.parametrize("dtype, heads, kv_heads, hd, block", [
    (torch.float32, 8, 2, 64, 16), (torch.bfloat16, 32, 8, 128, 16), (torch.float16, 32, 32, 128, 16),
    (torch.bfloat16, 9, 3, 64, 16), (torch.bfloat16, 12, 12, 64, 1)])
def test_kernel_equals_gather_path(spec, dtype, heads, kv_heads, hd, block):
    from flexserve.engine.paged_batch import paged_attend

    dev = torch.device("cuda")
    torch.manual_seed(2)
    num_blocks = 8192 // block * 4
    seqs = _long_scenario(block, num_blocks, spec, seed=3)
    batch = PagedBatch.build(seqs, block, dev)
    pool = torch.randn(2, num_blocks * block, kv_heads, hd, device=dev, dtype=dtype)
    t = batch.slots.numel()
    q = torch.randn(1, t, heads, hd, device=dev, dtype=dtype)
    k, v = torch.randn(1, t, kv_heads, hd, device=dev, dtype=dtype), torch.randn(1, t, kv_heads, hd,
                                                                                 device=dev, dtype=dtype)
    got = paged_attend(pool, batch)(q, k, v)[0].view(t, heads, hd)  # writes k, v, then the kernel
    want = _gather_attend(pool, batch, q)[0].view(t, heads, hd)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("sinks, window", [(4, 256), (0, 100), (16, 2048)])
@pytest.mark.parametrize("dtype, heads, kv_heads, hd", [(torch.bfloat16, 32, 8, 128), (torch.float32, 8, 8, 64)])
def test_streaming_kernel_equals_portable_path(sinks, window, dtype, heads, kv_heads, hd):
    from flexserve.engine.paged_batch import StreamingWindow, _window_attend, paged_attend

    dev, block = torch.device("cuda"), 16
    torch.manual_seed(4)
    num_blocks = 2048
    seqs = _long_scenario(block, num_blocks, MIXED, seed=5)
    for s in seqs:  # blocks the window released: the kernel must never read them
        for b in range(-(-sinks // block), max(0, s.start - window + 1) // block):
            s.block_table[b] = -1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    batch = PagedBatch.build(seqs, block, dev, streaming=StreamingWindow(sinks, window), inv_freq=inv_freq)
    pool = torch.randn(2, num_blocks * block, kv_heads, hd, device=dev, dtype=dtype)
    t = batch.slots.numel()
    q = torch.randn(1, t, heads, hd, device=dev, dtype=dtype)
    k, v = torch.randn(1, t, kv_heads, hd, device=dev, dtype=dtype), torch.randn(1, t, kv_heads, hd,
                                                                                 device=dev, dtype=dtype)
    got = paged_attend(pool, batch)(q, k, v)[0].view(t, heads, hd)
    want = _window_attend(pool, batch, q)[0].view(t, heads, hd)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

"""Attention through block tables: the step metadata, the portable gather path and (on CUDA) the Triton kernel
all equal a per-row reference: row t attends to positions [0, ctx_lens[t]) of its own sequence."""
import random

import pytest
import torch

from flexserve.engine.paged_batch import PagedBatch, SeqChunk, _gather_attend, paged_attend
from flexserve.kernels.paged_attention import kernel_available, paged_attention

BLOCK = 4


def _scenario(num_blocks=64, seed=0):
    """A mixed step: decodes of various lengths, a first chunk and a later chunk, scattered block tables."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for start, n, sample in [(6, 1, True), (0, 1, True), (13, 1, True), (0, 7, True), (9, 5, False), (30, 1, True)]:
        need = (start + n + BLOCK - 1) // BLOCK
        table = [free.pop() for _ in range(need)]
        seqs.append(SeqChunk([rng.randrange(50) for _ in range(n)], start, table, sample))
    return seqs


def _reference(q, pool, seqs, batch):
    """Per-row softmax attention over the row's own context, read slot by slot from the pool."""
    order = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1] + \
            [i for i, s in enumerate(seqs) if len(s.token_ids) != 1]
    rows = []
    for i in order:
        s = seqs[i]
        for j in range(len(s.token_ids)):
            ctx = s.start + j + 1
            slots = [s.block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)]
            rows.append(slots)
    h, hkv = q.shape[2], pool.shape[2]
    out = []
    for t, slots in enumerate(rows):
        k = pool[0][slots].float().repeat_interleave(h // hkv, dim=1)  # [L, H, hd]
        v = pool[1][slots].float().repeat_interleave(h // hkv, dim=1)
        w = torch.einsum("hd,lhd->hl", q[0, t].float(), k) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v).reshape(-1))
    return torch.stack(out)[None]


def test_metadata_matches_block_tables():
    seqs = _scenario()
    batch = PagedBatch.build(seqs, BLOCK, torch.device("cpu"))
    assert batch.num_decode == 4
    # flattened order: single-token rows first; every token's write slot and context length
    order = [0, 1, 2, 5, 3, 4]
    exp_slots, exp_ctx, exp_pos = [], [], []
    for i in order:
        s = seqs[i]
        for j in range(len(s.token_ids)):
            p = s.start + j
            exp_slots.append(s.block_table[p // BLOCK] * BLOCK + p % BLOCK)
            exp_ctx.append(p + 1)
            exp_pos.append(p)
    assert batch.slots.tolist() == exp_slots
    assert batch.ctx_lens.tolist() == exp_ctx
    assert batch.positions[0].tolist() == exp_pos
    assert batch.ids[0].tolist() == [t for i in order for t in seqs[i].token_ids]
    assert batch.sampled == [0, 1, 2, 5, 3]  # seq 4's chunk does not end its prompt
    assert batch.sample_rows.tolist() == [0, 1, 2, 3, 10]


@pytest.mark.parametrize("extra", [0, 1, 2, 3])
def test_metadata_arrays_start_on_16_bytes_whatever_the_sizes(extra):
    """Triton specialises a pointer on 16-byte alignment: metadata packed at offsets that follow the step's
    sizes would meet new patterns, each compiling a kernel variant in the middle of serving."""
    seqs = _scenario()
    seqs.append(SeqChunk([1] * (extra + 2), 0, [60, 61], True))  # an odd number of tokens and table entries
    seqs[0] = SeqChunk(seqs[0].token_ids, seqs[0].start + 4 * extra, seqs[0].block_table + list(range(56, 56 + extra)), True)
    batch = PagedBatch.build(seqs, BLOCK, torch.device("cpu"))
    arrays = (batch.ids, batch.positions, batch.slots, batch.sample_rows, batch.block_tables, batch.row_seq,
              batch.ctx_lens)
    assert all(a.data_ptr() % 16 == 0 for a in arrays), [a.data_ptr() % 16 for a in arrays]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 3)])
def test_gather_path_equals_reference(heads, kv_heads):
    torch.manual_seed(0)
    seqs = _scenario()
    batch = PagedBatch.build(seqs, BLOCK, torch.device("cpu"))
    pool = torch.randn(2, 64 * BLOCK, kv_heads, 16)
    t = batch.slots.numel()
    q = torch.randn(1, t, heads, 16)
    got = _gather_attend(pool, batch, q)
    torch.testing.assert_close(got, _reference(q, pool, seqs, batch), atol=1e-5, rtol=1e-5)


def test_attend_writes_new_keys_before_reading():
    torch.manual_seed(1)
    seqs = _scenario()
    batch = PagedBatch.build(seqs, BLOCK, torch.device("cpu"))
    pool = torch.randn(2, 64 * BLOCK, 2, 16)
    t = batch.slots.numel()
    q, k, v = torch.randn(1, t, 4, 16), torch.randn(1, t, 2, 16), torch.randn(1, t, 2, 16)
    got = paged_attend(pool, batch)(q, k, v)
    assert torch.equal(pool[0][batch.slots], k[0]) and torch.equal(pool[1][batch.slots], v[0])
    torch.testing.assert_close(got, _reference(q, pool, seqs, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype, heads, kv_heads, hd", [(torch.float32, 8, 2, 64), (torch.bfloat16, 32, 8, 128),
                                                        (torch.float16, 12, 12, 64)])
def test_kernel_equals_gather_path(dtype, heads, kv_heads, hd):
    dev = torch.device("cuda")
    torch.manual_seed(2)
    seqs = _scenario(num_blocks=1024)
    for s in seqs:  # longer contexts, so the kernel loops over several key tiles
        s.start *= 20
    free = list(range(1024))
    random.Random(3).shuffle(free)
    for s in seqs:
        s.block_table = [free.pop() for _ in range((s.start + len(s.token_ids) + BLOCK - 1) // BLOCK)]
    batch = PagedBatch.build(seqs, BLOCK, dev)
    pool = torch.randn(2, 1024 * BLOCK, kv_heads, hd, device=dev, dtype=dtype)
    t = batch.slots.numel()
    q = torch.randn(1, t, heads, hd, device=dev, dtype=dtype)
    assert kernel_available(q)
    got = paged_attention(q[0], pool[0], pool[1], batch.block_tables, batch.row_seq, batch.ctx_lens, BLOCK)
    want = _gather_attend(pool, batch, q)[0].view(t, heads, hd)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

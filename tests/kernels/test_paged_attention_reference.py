"""The portable paged-attention path (`paged_attend` on the CPU) against plain causal attention computed
densely per sequence.

Each sequence has dense keys, values and queries for all its positions. Its keys live in a shared pool through
a random block table (non-contiguous, shuffled blocks, the rest of the pool random garbage); two serving steps
mix decode rows with prompt chunks (first chunks, later chunks, a chunk ending on a block boundary). Every row's
output must equal softmax attention over its own sequence's positions 0..p, and every key written must land
in the slot its block table names. Rows are identified by their token ids (sequence * 1000 + position), so the
check does not depend on the order in which the batch lays its rows out."""
import random

import pytest
import torch

from flexserve.engine.paged_batch import PagedBatch, SeqChunk, paged_attend
from flexserve.kernels import paged_attention as kernel

from ..conftest import reference_attention

HD = 16
# (positions already in the pool, tokens computed in step 1, tokens computed in step 2)
SEQS = [
    (20, 1, 1),  # a running sequence: a decode row in both steps
    (0, 1, 1),  # a one-token prompt, then its first decode
    (33, 1, 1),  # a longer context, crossing block boundaries at block size 16
    (0, 7, 1),  # a whole prompt in one chunk, then a decode
    (0, 16, 9),  # a first chunk that ends on a block boundary, then the second chunk
    (9, 5, 3),  # a later chunk after a prefix, then another chunk
]


def _uid(seq: int, pos: int) -> int:
    return seq * 1000 + pos


@pytest.fixture(params=[1, 16], ids=["block1", "block16"])
def block(request):
    return request.param


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 3)], ids=["mha", "gqa4", "gqa2"])
def test_gather_path_equals_dense_causal_attention_per_sequence(block, heads, kv_heads):
    torch.manual_seed(block * 100 + heads)
    rng = random.Random(block * 100 + heads)
    totals = [sum(s) for s in SEQS]
    q_all = [torch.randn(n, heads, HD) for n in totals]
    k_all = [torch.randn(n, kv_heads, HD) for n in totals]
    v_all = [torch.randn(n, kv_heads, HD) for n in totals]
    need = [-(-n // block) for n in totals]
    num_blocks = sum(need) + 7
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    assert any(t != sorted(t) or t[-1] - t[0] != len(t) - 1 for t in tables if len(t) > 1)  # really scattered
    pool = torch.randn(2, num_blocks * block, kv_heads, HD)  # garbage everywhere not yet written

    def slot(i, p):
        return tables[i][p // block] * block + p % block

    for i, (prefix, _, _) in enumerate(SEQS):  # the context computed by earlier steps
        for p in range(prefix):
            pool[0, slot(i, p)], pool[1, slot(i, p)] = k_all[i][p], v_all[i][p]

    starts = [s[0] for s in SEQS]
    for step in (1, 2):
        counts = [s[step] for s in SEQS]
        chunks = [SeqChunk([_uid(i, p) for p in range(start, start + n)], start, tables[i], sample=True)
                  for i, (start, n) in enumerate(zip(starts, counts))]
        batch = PagedBatch.build(chunks, block, torch.device("cpu"))
        rows = [(u // 1000, u % 1000) for u in batch.ids[0].tolist()]
        assert sorted(rows) == sorted((i, p) for i, (s, n) in enumerate(zip(starts, counts))
                                      for p in range(s, s + n))
        q = torch.stack([q_all[i][p] for i, p in rows])[None]
        k = torch.stack([k_all[i][p] for i, p in rows])[None]
        v = torch.stack([v_all[i][p] for i, p in rows])[None]
        assert not kernel.kernel_available(q)  # on the CPU the portable path runs
        got = paged_attend(pool, batch)(q, k, v)
        assert got.shape == (1, len(rows), heads * HD)
        for t, (i, p) in enumerate(rows):
            allowed = torch.ones(1, p + 1, dtype=torch.bool)
            want = reference_attention(q_all[i][p:p + 1], k_all[i][:p + 1], v_all[i][:p + 1], allowed)[0]
            torch.testing.assert_close(got[0, t].double(), want, atol=1e-5, rtol=1e-5, msg=f"seq {i} pos {p}")
        starts = [s + n for s, n in zip(starts, counts)]
    for i, end in enumerate(starts):  # every position written so far sits where its block table says
        slots = [slot(i, p) for p in range(end)]
        assert torch.equal(pool[0, slots], k_all[i][:end]) and torch.equal(pool[1, slots], v_all[i][:end])


def test_kernel_is_chosen_only_for_cuda_with_triton_and_a_power_of_two_head_size(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("FLEXSERVE_PAGED_ATTENTION", raising=False)
    monkeypatch.setattr(kernel, "triton", None)
    assert not kernel.kernel_supports(cuda, 64)  # no Triton: the gather path
    monkeypatch.setattr(kernel, "triton", object())
    assert not kernel.kernel_supports(torch.device("cpu"), 64)
    assert [hd for hd in (8, 16, 24, 48, 64, 96, 128, 256) if kernel.kernel_supports(cuda, hd)] == [16, 64, 128, 256]
    monkeypatch.setenv("FLEXSERVE_PAGED_ATTENTION", "gather")
    assert not kernel.kernel_supports(cuda, 64)

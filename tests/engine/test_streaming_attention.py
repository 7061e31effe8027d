"""StreamingLLM over the paged cache: sinks plus a sliding window, positions counted in the cache.

The reference re-rotates every visible key and the query at their places in the cache (what StreamingLLM
defines); the engine keeps keys rotated at their text positions and only rotates the sinks' query. The two
must agree, for decode rows and prompt chunks, GQA or not, with blocks outside the window released."""
import random

import pytest
import torch

from flexserve.engine.paged_batch import PagedBatch, SeqChunk, StreamingWindow, paged_attend
from flexserve.models.layers import apply_rope, rope_cos_sin

BLOCK = 4
HD = 16


def _inv_freq():
    return 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))


def _rot(x, pos):
    """x [..., L, H, hd] rotated at integer positions pos [L]."""
    cos, sin = rope_cos_sin(_inv_freq(), torch.as_tensor(pos)[None], x.dtype)
    return apply_rope(x[None], cos, sin)[0]


def _reference(q_raw, k_raw, v, p, sinks, window, group):
    """Query at text position p over raw (unrotated) keys 0..p: StreamingLLM's cache, cache positions."""
    keep = [i for i in range(p + 1) if i < sinks or p - i < window]
    kc = _rot(k_raw[keep], list(range(len(keep))))  # [L, Hkv, hd] at cache positions
    qc = _rot(q_raw[None], [len(keep) - 1])[0]  # the query is the cache's last entry
    kc, vc = kc.repeat_interleave(group, 1), v[keep].repeat_interleave(group, 1)
    w = torch.einsum("hd,lhd->hl", qc, kc) / HD ** 0.5
    return torch.einsum("hl,lhd->hd", w.softmax(-1), vc)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("sinks, window", [(4, 8), (0, 5), (3, 64)])
def test_paged_streaming_equals_cache_position_reference(heads, kv_heads, sinks, window):
    torch.manual_seed(0)
    rng = random.Random(1)
    group = heads // kv_heads
    win = StreamingWindow(sinks, window)
    # sequences: (total tokens so far, tokens computed this step): decodes deep past the window, a chunk
    specs = [(40, 1), (9, 1), (70, 1), (50, 13)]
    free = list(range(200))
    rng.shuffle(free)
    raw, seqs = [], []
    pool = torch.zeros(2, 200 * BLOCK, kv_heads, HD)
    for total, n in specs:
        q_raw, k_raw, v = torch.randn(total, heads, HD), torch.randn(total, kv_heads, HD), torch.randn(total, kv_heads, HD)
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        k_text = _rot(k_raw, list(range(total)))  # the cache stores keys rotated at text positions
        for pos in range(total - n):
            slot = table[pos // BLOCK] * BLOCK + pos % BLOCK
            pool[0, slot], pool[1, slot] = k_text[pos], v[pos]
        first_kept = -(-sinks // BLOCK)
        for b in range(first_kept, max(0, total - n - window + 1) // BLOCK):  # released by the block manager
            table[b] = -1
        raw.append((q_raw, k_raw, k_text, v))
        seqs.append(SeqChunk([1] * n, total - n, table, True))
    batch = PagedBatch.build(seqs, BLOCK, torch.device("cpu"), streaming=win, inv_freq=_inv_freq())
    order = [0, 1, 2, 3]  # decodes first, then the chunk: the same order as specs
    q = torch.cat([_rot(raw[i][0][specs[i][0] - specs[i][1]:], list(range(specs[i][0] - specs[i][1], specs[i][0])))
                   for i in order])[None]
    k = torch.cat([raw[i][2][specs[i][0] - specs[i][1]:] for i in order])[None]
    v = torch.cat([raw[i][3][specs[i][0] - specs[i][1]:] for i in order])[None]
    got = paged_attend(pool, batch)(q, k, v)[0].view(-1, heads, HD)
    want = []
    for i in order:
        total, n = specs[i]
        for p in range(total - n, total):
            want.append(_reference(raw[i][0][p], raw[i][1], raw[i][3], p, sinks, window, group))
    torch.testing.assert_close(got, torch.stack(want), atol=2e-5, rtol=2e-5)

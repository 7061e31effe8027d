"""`dense_attention` over a left-padded, sequence-major (or head-major) cache equals each sequence's own causal
attention computed without padding, through a prefill, a decode step and a chunk after a prefix."""
import pytest
import torch

from flexserve.models.attention import AttnMeta, causal_mask, dense_attention

from ..conftest import reference_attention

LENGTHS = [5, 2, 7]  # real tokens of each row; the batch is left-padded to the longest
H, HKV, HD, S_MAX = 4, 2, 8, 12


def _cache(seq_dim):
    shape = (S_MAX, len(LENGTHS), HKV, HD) if seq_dim == 0 else (len(LENGTHS), HKV, S_MAX, HD)
    return torch.full(shape, float("nan")), torch.full(shape, float("nan"))  # unwritten slots must not be read


def _own_attention(q, k, v, valid, start):
    """Row by row: the real keys only (padding dropped), causal by position. q: this call's queries
    [B, S, H, hd] at positions start.., k/v: every position's keys; valid: [B, start + S] -> [B, S, H * hd]."""
    out = torch.zeros(q.shape[0], q.shape[1], H * HD, dtype=torch.float64)
    for b in range(q.shape[0]):
        keep = valid[b].nonzero()[:, 0]
        new = keep[keep >= start]  # this call's real query positions
        allowed = keep[None, :] <= new[:, None]
        out[b, new - start] = reference_attention(q[b, new - start], k[b, keep], v[b, keep], allowed)
    return out


def _check(got, want, valid, start):
    real = valid[:, start:start + got.shape[1]]
    assert torch.isfinite(got).all()  # padded query rows too: a NaN there would reach the next layer
    torch.testing.assert_close(got[real].double(), want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_dim", [0, 2])
def test_left_padded_prefill_then_decode_equals_each_sequence_alone(seq_dim):
    torch.manual_seed(0)
    b, length = len(LENGTHS), max(LENGTHS)
    valid = torch.tensor([[False] * (length - n) + [True] * n for n in LENGTHS])
    q, k, v = torch.randn(b, length + 2, H, HD), torch.randn(b, length + 2, HKV, HD), torch.randn(b, length + 2, HKV, HD)
    k_cache, v_cache = _cache(seq_dim)
    # the padded slots of the cache hold garbage the mask must hide (a prefill writes them anyway)
    got = dense_attention(q[:, :length], k[:, :length], v[:, :length], k_cache, v_cache,
                          AttnMeta(0, length, valid), seq_dim=seq_dim)
    _check(got, _own_attention(q[:, :length], k, v, valid, 0), valid, 0)
    for step in range(2):  # two decode steps: one new key per row, appended after the prompt
        start = length + step
        valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool)], 1)
        got = dense_attention(q[:, start:start + 1], k[:, start:start + 1], v[:, start:start + 1], k_cache,
                              v_cache, AttnMeta(start, 1, valid), seq_dim=seq_dim)
        _check(got, _own_attention(q[:, start:start + 1], k, v, valid, start), valid, start)
    # the cache holds every written key at its position, in the layout asked for
    written = k_cache[:length + 2].transpose(0, 1) if seq_dim == 0 else k_cache[:, :, :length + 2].transpose(1, 2)
    assert torch.equal(written, k)


@pytest.mark.parametrize("seq_dim", [0, 2])
def test_unpadded_chunk_after_a_prefix_is_causal(seq_dim):
    """No padding (no key mask), a 4-token chunk after a 5-token prefix: the explicit causal mask path."""
    torch.manual_seed(1)
    b, n = len(LENGTHS), 9
    q, k, v = torch.randn(b, n, H, HD), torch.randn(b, n, HKV, HD), torch.randn(b, n, HKV, HD)
    k_cache, v_cache = _cache(seq_dim)
    first = dense_attention(q[:, :5], k[:, :5], v[:, :5], k_cache, v_cache, AttnMeta(0, 5, None), seq_dim=seq_dim)
    chunk = dense_attention(q[:, 5:], k[:, 5:], v[:, 5:], k_cache, v_cache, AttnMeta(5, 4, None), seq_dim=seq_dim)
    valid = torch.ones(b, n, dtype=torch.bool)
    torch.testing.assert_close(torch.cat([first, chunk], 1).double(), _own_attention(q, k, v, valid, 0),
                               atol=1e-5, rtol=1e-5)


def test_padded_query_rows_see_themselves_and_real_rows_never_see_padding():
    meta = AttnMeta(0, 3, torch.tensor([[False, True, True], [True, True, True]]))
    mask = meta.mask(torch.device("cpu"))
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert mask[1, 0].tolist() == causal_mask(0, 3, torch.device("cpu"))[0, 0].tolist()
    assert causal_mask(2, 2, torch.device("cpu"))[0, 0].tolist() == [[True, True, True, False], [True] * 4]

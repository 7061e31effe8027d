"""GGUF's Q4_0, Q4_1 and Q8_0 blocks as flexserve weights: the same values as `gguf.quants.dequantize`, bit for bit
in float32 (a Q4_0 zero's sign aside), at the file's size, multiplied like the dequantised matrix."""
import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexserve.compression.ggml import KEPT_TYPES, ggml_weight
from flexserve.compression.linear import linear
from flexserve.compression.qweight import Int4Weight, Int8GroupWeight
from flexserve.errors import ModelLoadError
from flexserve.weights import gguf_blocks


def blocks_of(w: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the file's blocks of w [N, K] as gguf quantises it, uint8 [N, row bytes]; gguf's dequantised w)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(raw), torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), np.float32))


def matrix(seed: int, n: int = 24, k: int = 96) -> torch.Tensor:
    """Rows of very different magnitudes, a constant row and an all-zero row: scales from tiny to large."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 2, n)[:, None]
    w[3] = 0.25
    w[5] = 0.0
    return w


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, signed_zeros: bool) -> None:
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)  # as numbers
    same = got.view(torch.int32) == want.view(torch.int32)
    if not signed_zeros:  # Q4_0's d * (q - 8) is -0.0 for q = 8 and d < 0; min + q * scale gives +0.0
        same |= want == 0
    assert bool(same.all())


@pytest.mark.parametrize("type_name", KEPT_TYPES)
def test_kept_blocks_dequantize_bit_for_bit_as_gguf(type_name):
    for seed in range(3):
        w = matrix(seed)
        raw, want = blocks_of(w, type_name)
        q = ggml_weight(type_name, raw, w.shape[1])
        assert q.shape == w.shape
        assert_same_bits(q.dequantize(torch.float32), want, signed_zeros=type_name != "Q4_0")


def test_each_type_becomes_its_packed_form_at_the_file_size():
    w = matrix(0)
    n, groups = w.shape[0], w.shape[1] // 32
    for type_name, kind, extra in (("Q4_0", Int4Weight, n * groups * 2), ("Q4_1", Int4Weight, 0),
                                   ("Q8_0", Int8GroupWeight, 0)):
        raw, _ = blocks_of(w, type_name)
        q = ggml_weight(type_name, raw, w.shape[1])
        assert type(q) is kind and q.group_size == 32, type_name
        assert q.nbytes == raw.numel() + extra, type_name  # only Q4_0 gains a stored min (fp16 per block)


def test_a_q4_0_scale_too_large_for_a_float16_min_keeps_float32():
    w = matrix(1)
    w[-1] *= 1e3  # values near 3e5: d near 4e4 is a float16, -8d is not
    raw, want = blocks_of(w, "Q4_0")
    q = ggml_weight("Q4_0", raw, w.shape[1])
    assert q.min.dtype == torch.float32
    assert torch.equal(q.dequantize(torch.float32), want)


@pytest.mark.parametrize("type_name", KEPT_TYPES)
def test_linear_gives_the_product_with_the_dequantized_matrix(type_name):
    w = matrix(2)
    raw, want = blocks_of(w, type_name)
    q = ggml_weight(type_name, raw, w.shape[1])
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
    bias = torch.randn(w.shape[0])
    assert torch.equal(linear(x, q, bias), F.linear(x, want, bias))
    # lower precisions: the exact float32 value, rounded once to the dtype
    for dtype in (torch.bfloat16, torch.float16):
        if type_name != "Q4_1":  # Q4_1's + m may round in float16 before the cast
            assert torch.equal(q.dequantize(dtype), want.to(dtype)), dtype


def test_the_reader_keeps_the_types_this_module_converts():
    assert gguf_blocks.KEPT_TYPES == KEPT_TYPES


@pytest.mark.parametrize("type_name, blocks, k, message", [
    ("Q4_K", torch.zeros(2, 144, dtype=torch.uint8), 256, "Q4_K has no quantized form"),
    ("Q4_0", torch.zeros(2, 35, dtype=torch.uint8), 64, r"Q4_0 blocks of shape \(2, 35\)"),
    ("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), 40, "do not hold rows of 40 values"),
])
def test_blocks_that_do_not_fit_are_one_clear_error(type_name, blocks, k, message):
    with pytest.raises(ModelLoadError, match=message):
        ggml_weight(type_name, blocks, k)

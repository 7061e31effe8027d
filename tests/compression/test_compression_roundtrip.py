"""compress/decompress: the documented error bound, exact cases, padding and the `out=` path."""
import math

import pytest
import torch

from flexserve.compression import CompressionConfig, compress, decompress

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("shape, group_dim, group_size", [
    ((256,), 0, 64),
    ((3, 128), -1, 64),
    ((128, 5), 0, 32),
    ((2, 3, 100), -1, 64),   # padded last group
    ((2, 40, 3), 1, 16),     # padded, grouped along a middle dim
    ((5, 7, 33), 2, 8),
    ((2, 4, 6, 64), -1, 64),  # KV cache [B, H, S, D] grouped along D
])
def test_error_within_documented_bound(dtype, num_bits, shape, group_dim, group_size, within_bound):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    config = CompressionConfig(num_bits=num_bits, group_size=group_size, group_dim=group_dim)
    within_bound(x, decompress(compress(x, config)), config)


@pytest.mark.parametrize("num_bits", [4, 8])
def test_fp16_scales_for_fp32_source_stay_within_bound(num_bits, within_bound):
    torch.manual_seed(1)
    x = torch.randn(16, 256) * 10
    config = CompressionConfig(num_bits=num_bits, scale_dtype=torch.float16)
    c = compress(x, config)
    assert c.scale.dtype == c.min.dtype == torch.float16
    # rounded outwards, so each group's stored grid still covers its values
    groups = x.view(16, 4, 64)
    assert (c.min.float() <= groups.amin(-1, keepdim=True)).all()
    assert (c.scale.float() >= (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / config.max_level).all()
    within_bound(x, decompress(c), config, scale_dtype=torch.float16)


def test_error_bound_is_tight_not_loose():
    # uniform data fills the whole range, so the worst error should be close to half a step
    torch.manual_seed(2)
    x = torch.rand(64, 64)
    config = CompressionConfig(num_bits=4)
    error = (x - decompress(compress(x, config))).abs().max().item()
    assert 0.3 / 15 < error <= 0.5 / 15 + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_bits", [4, 8])
def test_values_on_the_grid_roundtrip_exactly(dtype, num_bits):
    torch.manual_seed(3)
    config = CompressionConfig(num_bits=num_bits, group_size=32)
    levels = config.max_level
    num_groups = 6
    k = torch.randint(0, levels + 1, (num_groups, 32))
    k[:, 0], k[:, 1] = 0, levels  # each group spans the full grid, so its min and scale are exact
    step = torch.tensor([0.25, 0.5, 1.0, 2.0, 0.125, 4.0]).unsqueeze(1)
    low = torch.tensor([-1.5, 0.0, -3.0, -100.0, -7.25, -4.0]).unsqueeze(1)
    # low / step is an integer in [-255, 0], so every value is (an integer of magnitude <= 255) * 2**e:
    # exact even in bfloat16's 8-bit significand
    x = (low + k * step).to(dtype)
    assert torch.equal(x.double(), low.double() + k * step.double())
    assert torch.equal(decompress(compress(x, config)), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_bits", [4, 8])
def test_constant_groups_are_exact_and_nan_free(dtype, num_bits):
    config = CompressionConfig(num_bits=num_bits, group_size=16)
    x = torch.randn(4, 64).to(dtype)
    x[0] = 3.7
    x[1] = 0.0
    x[2, :16] = -2.5   # one constant group beside varying ones
    x[3, 32:] = 1e-3
    c = compress(x, config)
    assert torch.isfinite(c.scale).all() and torch.isfinite(c.min).all()
    y = decompress(c)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], x[1])
    assert torch.equal(y[2, :16], x[2, :16]) and torch.equal(y[3, 32:], x[3, 32:])


def test_padding_when_dim_is_not_a_multiple_of_the_group(within_bound):
    torch.manual_seed(4)
    config = CompressionConfig(num_bits=4, group_size=64)
    x = torch.randn(3, 129)  # two full groups and a last group of one element
    c = compress(x, config)
    assert c.num_groups == 3 and c.data.shape == (3, 3, 32)
    y = decompress(c)
    assert y.shape == x.shape
    assert torch.equal(y[:, 128], x[:, 128])  # a one-element group is constant, hence exact
    within_bound(x, y, config)


def test_padding_does_not_widen_the_last_group():
    # the last group holds values in [10, 10.3]: padding must not pull its min or max elsewhere
    config = CompressionConfig(num_bits=4, group_size=64)
    x = torch.cat([torch.linspace(-50, 50, 64), torch.linspace(10, 10.3, 6)])
    c = compress(x, config)
    assert c.min[1].item() == pytest.approx(10.0)
    assert (c.scale[1] * 15).item() == pytest.approx(0.3, rel=1e-5)


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("shape, group_dim", [((8, 256), -1), ((3, 5, 64), 1), ((6, 100), -1)])
def test_packed_size(num_bits, shape, group_dim):
    config = CompressionConfig(num_bits=num_bits, group_size=64, group_dim=group_dim)
    x = torch.randn(shape)
    c = compress(x, config)
    dim_size = shape[group_dim]
    padded_numel = x.numel() // dim_size * math.ceil(dim_size / 64) * 64
    if num_bits == 4:
        assert c.data.nbytes == math.ceil(padded_numel / 2)
        if dim_size % 64 == 0:
            assert c.data.nbytes == math.ceil(x.numel() / 2)
    else:
        assert c.data.nbytes == padded_numel
    num_groups = padded_numel // 64
    assert c.nbytes == c.data.nbytes + 2 * num_groups * 4


def test_4bit_packs_half_groups_into_low_and_high_nibbles():
    config = CompressionConfig(num_bits=4, group_size=4)
    x = torch.tensor([0.0, 1.0, 14.0, 15.0])  # min 0, scale 1, q = x
    assert compress(x, config).data.tolist() == [[0 | 14 << 4, 1 | 15 << 4]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("shape, group_dim", [((4, 128), -1), ((64, 6), 0), ((2, 70), -1)])
def test_decompress_into_preallocated_out(dtype, num_bits, shape, group_dim):
    torch.manual_seed(5)
    config = CompressionConfig(num_bits=num_bits, group_dim=group_dim)
    x = torch.randn(shape).to(dtype)
    c = compress(x, config)
    out = torch.full(shape, float("nan"), dtype=dtype)
    result = decompress(c, out=out)
    assert result is out
    assert torch.equal(out, decompress(c))


def test_decompress_into_a_strided_view():
    config = CompressionConfig(num_bits=4)
    x = torch.randn(4, 128)
    c = compress(x, config)
    big = torch.zeros(4, 200)
    decompress(c, out=big[:, 10:138])
    assert torch.equal(big[:, 10:138], decompress(c))
    assert (big[:, :10] == 0).all() and (big[:, 138:] == 0).all()


def test_decompress_rejects_a_mismatched_out():
    c = compress(torch.randn(4, 64), CompressionConfig())
    with pytest.raises(ValueError):
        decompress(c, out=torch.empty(4, 65))
    with pytest.raises(ValueError):
        decompress(c, out=torch.empty(4, 64, dtype=torch.float16))


def test_unsupported_dtype_is_rejected():
    with pytest.raises(ValueError):
        compress(torch.arange(64), CompressionConfig())


def test_empty_tensor():
    x = torch.empty(0, 64)
    y = decompress(compress(x, CompressionConfig()))
    assert y.shape == (0, 64)

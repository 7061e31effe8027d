"""CompressedTensor: preallocation, writing a KV-cache slice, moving between devices."""
import pytest
import torch

from flexserve.compression import (CompressedTensor, CompressionConfig, compress, compress_into,
                                   compressed_nbytes, decompress)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_appends_tokens_with_compress_into_on_a_slice(num_bits, dtype):
    torch.manual_seed(0)
    config = CompressionConfig(num_bits=num_bits, group_size=32, group_dim=-1)
    batch, heads, seq, head_dim = 2, 3, 10, 64
    kv = torch.randn(batch, heads, seq, head_dim).to(dtype)  # [B, H, S, D]
    cache = CompressedTensor.empty(kv.shape, dtype, config)
    compress_into(kv[:, :, :6], cache.narrow(2, 0, 6))  # the prompt
    for t in range(6, seq):  # then one token per decode step
        compress_into(kv[:, :, t:t + 1], cache.narrow(2, t, 1))
    whole = compress(kv, config)
    assert torch.equal(cache.data, whole.data)
    assert torch.equal(cache.scale, whole.scale) and torch.equal(cache.min, whole.min)
    # reading back only the filled prefix works on a view too
    assert torch.equal(decompress(cache.narrow(2, 0, 8)), decompress(whole)[:, :, :8])


def test_narrow_is_a_view_sharing_buffers():
    cache = CompressedTensor.empty((2, 4, 16, 64), torch.float32, CompressionConfig())
    view = cache.narrow(2, 3, 5)
    assert view.shape == (2, 4, 5, 64)
    assert view.data.data_ptr() == cache.data[:, :, 3].data_ptr()


def test_narrow_along_a_middle_dim_when_grouping_along_dim_0():
    torch.manual_seed(1)
    config = CompressionConfig(num_bits=4, group_size=16, group_dim=0)
    x = torch.randn(48, 5, 7)
    cache = CompressedTensor.empty(x.shape, x.dtype, config)
    compress_into(x[:, :2], cache.narrow(1, 0, 2))
    compress_into(x[:, 2:], cache.narrow(-2, 2, 3))
    assert torch.equal(decompress(cache), decompress(compress(x, config)))


def test_narrow_along_the_grouped_dim_is_refused():
    cache = CompressedTensor.empty((4, 128), torch.float32, CompressionConfig())
    with pytest.raises(ValueError):
        cache.narrow(1, 0, 64)


def test_compress_into_checks_shape_and_dtype():
    cache = CompressedTensor.empty((2, 4, 8, 64), torch.float16, CompressionConfig())
    with pytest.raises(ValueError):
        compress_into(torch.randn(2, 4, 2, 64, dtype=torch.float16), cache.narrow(2, 0, 1))
    with pytest.raises(ValueError):
        compress_into(torch.randn(2, 4, 1, 64), cache.narrow(2, 0, 1))


@pytest.mark.parametrize("shape, dtype, config", [
    ((4, 130), torch.float32, CompressionConfig()),
    ((64, 6), torch.bfloat16, CompressionConfig(num_bits=8, group_dim=0)),
    ((3, 256), torch.float32, CompressionConfig(scale_dtype=torch.float16)),
])
def test_nbytes_matches_the_estimate(shape, dtype, config):
    c = compress(torch.randn(shape).to(dtype), config)
    assert c.nbytes == compressed_nbytes(shape, dtype, config)
    assert CompressedTensor.empty(shape, dtype, config, device="meta").nbytes == c.nbytes


def test_to_moves_every_part_and_returns_a_new_tensor():
    c = compress(torch.randn(4, 128), CompressionConfig())
    moved = c.to("meta")
    assert isinstance(moved, CompressedTensor) and moved is not c
    assert moved.data.is_meta and moved.scale.is_meta and moved.min.is_meta
    assert (moved.shape, moved.dtype, moved.config, moved.nbytes) == (c.shape, c.dtype, c.config, c.nbytes)
    assert c.data.device.type == "cpu"  # the original is untouched


def test_bad_buffers_are_rejected():
    c = compress(torch.randn(4, 128), CompressionConfig())
    with pytest.raises(ValueError):
        CompressedTensor(data=c.data.float(), scale=c.scale, min=c.min, shape=c.shape, dtype=c.dtype,
                         config=c.config)
    with pytest.raises(ValueError):
        CompressedTensor(data=c.data, scale=c.scale[:2], min=c.min, shape=c.shape, dtype=c.dtype,
                         config=c.config)


@needs_cuda
def test_pin_memory_pins_every_part():
    pinned = compress(torch.randn(4, 128), CompressionConfig()).pin_memory()
    assert pinned.is_pinned()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_bits", [4, 8])
def test_cuda_roundtrip_and_transfer(dtype, num_bits, within_bound):
    torch.manual_seed(2)
    config = CompressionConfig(num_bits=num_bits)
    x = torch.randn(8, 3, 200).to(dtype)
    gpu = compress(x.cuda(), config)
    assert gpu.data.is_cuda and gpu.scale.is_cuda and gpu.min.is_cuda
    within_bound(x, decompress(gpu).cpu(), config)
    # CUDA divides by a scalar through its reciprocal and fuses multiply-adds, so scales and
    # decoded values may differ from the CPU's in the last bit, and a code at a .5 tie may flip
    cpu = compress(x, config)
    torch.testing.assert_close(gpu.scale.cpu(), cpu.scale, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert (gpu.data.cpu() == cpu.data).float().mean() > 0.99
    moved = cpu.pin_memory().to("cuda", non_blocking=True)
    out = torch.empty(x.shape, dtype=dtype, device="cuda")
    torch.testing.assert_close(decompress(moved, out=out).cpu(), decompress(cpu))

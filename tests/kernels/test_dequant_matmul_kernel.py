"""The fused 4-bit dequantise-and-multiply kernel: its portable reference equals the dequantised weight's
product (CPU), and the Triton kernel equals the reference at decode sizes (GPU; CI has none)."""
import pytest
import torch
import torch.nn.functional as F

from flexserve.compression.schemes import quantize
from flexserve.kernels.dequant_matmul import MAX_FUSED_ROWS, int4_matmul, int4_matmul_reference, is_fused_int4_shape


def _weight(n, k, group_size, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize("rtn4", (torch.randn(n, k, generator=g) * 0.05).to(device=device, dtype=dtype), group_size)


@pytest.mark.parametrize("group_size", [32, 128])
def test_reference_equals_the_dequantised_product(group_size):
    w = _weight(40, 256, group_size, torch.float32)
    x = torch.randn(3, 256)
    want = F.linear(x, w.dequantize(torch.float32))
    torch.testing.assert_close(int4_matmul_reference(x, w.data, w.scale, w.min), want, rtol=1e-5, atol=1e-5)
    assert not is_fused_int4_shape(x, 256, group_size)  # no CUDA here: the reference runs
    torch.testing.assert_close(int4_matmul(x, w.data, w.scale, w.min), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("rows", [1, 3, MAX_FUSED_ROWS])
@pytest.mark.parametrize("n, k, group_size, dtype", [(4096, 4096, 128, torch.float16), (1000, 8192, 128, torch.bfloat16),
                                                     (28672, 8192, 128, torch.bfloat16), (512, 1024, 64, torch.float16)])
def test_kernel_equals_the_reference(rows, n, k, group_size, dtype):
    from flexserve.models.linear import linear

    dev = torch.device("cuda")
    w = _weight(n, k, group_size, dtype, dev)
    x = torch.randn(rows, k, device=dev, dtype=dtype)
    assert is_fused_int4_shape(x, k, group_size)
    want = int4_matmul_reference(x.float(), w.data, w.scale, w.min)
    got = int4_matmul(x, w.data, w.scale, w.min)
    assert got.dtype == dtype and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    bias = torch.randn(n, device=dev, dtype=dtype)
    torch.testing.assert_close(linear(x[None], w, bias)[0].float(), want + bias.float(), rtol=2e-2,
                               atol=2e-2 * want.abs().max().item())  # the model's dispatch takes the kernel

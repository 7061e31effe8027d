"""Per-token activation quantisation: the portable math's properties (CPU), and the fused Triton kernel equal to
it bit for bit (GPU; CI has none), through the model layer's `linear` as well."""
import pytest
import torch

from flexserve.compression.linear import per_token
from flexserve.compression.qweight import FP8_DTYPE, FP8_MAX, INT8_MAX
from flexserve.kernels.act_quant import per_token_quant, per_token_quant_available


def _activation(m, k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    if m:
        x[0, :4] = torch.tensor([127.0, 0.5, 2.5, -1.5])  # with row max 127 these scale to exact int8 ties
        x[0, 4:] = x[0, 4:].clamp(-127, 127)
    return x.to(device=device, dtype=dtype)


def test_portable_math_scales_each_row_to_its_maximum_and_rounds_ties_to_even():
    x = _activation(4, 300, torch.float32)
    q, s = per_token(x, torch.int8, INT8_MAX)
    assert q.dtype == torch.int8 and s.shape == (4, 1) and s.dtype == torch.float32
    assert torch.equal(q.abs().amax(-1), torch.full((4,), 127, dtype=torch.int8))
    assert q[0, :4].tolist() == [127, 0, 2, -2]
    f, fs = per_token(x, FP8_DTYPE, FP8_MAX)
    torch.testing.assert_close(fs, s * (INT8_MAX / FP8_MAX))
    assert f.float().abs().amax().item() == FP8_MAX
    assert not per_token_quant_available(x)  # no CUDA here: the layer keeps the portable math


@pytest.mark.skipif(not (torch.cuda.is_available() and per_token_quant_available(torch.empty(1, device="cuda"))),
                    reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m, k", [(1, 64), (7, 4096), (300, 14336), (0, 128), (5, 1000)])
@pytest.mark.parametrize("out, qmax", [(FP8_DTYPE, FP8_MAX), (torch.int8, INT8_MAX)])
def test_kernel_equals_the_portable_math_bit_for_bit(dtype, m, k, out, qmax):
    x = _activation(m, k, dtype, "cuda")
    q, s = per_token_quant(x, out, qmax)
    rq, rs = per_token(x, out, qmax)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path needs CUDA")
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_model_linear_with_the_kernel_equals_the_portable_path(scheme):
    from flexserve.compression.linear import linear as portable_linear
    from flexserve.compression.schemes import quantize
    from flexserve.models.linear import linear

    g = torch.Generator().manual_seed(1)
    w = quantize(scheme, (torch.randn(512, 1024, generator=g) * 0.05).to("cuda", torch.bfloat16), 128)
    x = _activation(33, 1024, torch.bfloat16, "cuda")
    assert torch.equal(linear(x, w), portable_linear(x, w))

"""Fused RMSNorm, rotary embedding and SiLU-gated activation: the kernels equal their PyTorch references (GPU),
and everywhere else the layers run exactly the references (CPU)."""
import pytest
import torch

from flexserve.kernels import fused

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype):  # the kernels round once, the references after every operation
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def test_cpu_runs_the_references_exactly(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64), torch.randn(64)
    assert torch.equal(fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5))
    q = torch.randn(2, 5, 4, 16)
    cos, sin = torch.randn(2, 5, 1, 16), torch.randn(2, 5, 1, 16)
    assert torch.equal(fused.rope(q, cos, sin), fused.rope_reference(q, cos, sin))
    u = torch.randn(7, 2 * 48)
    assert torch.equal(fused.silu_mul(u), fused.silu_mul_reference(u))
    assert not fused.fused_available(x)


def test_rope_reference_rotates_pairs_by_the_angle():
    """Half-split pairs (i, i + hd/2) turn by their angle: a rotation keeps the pair's length."""
    x = torch.randn(1, 3, 2, 8)
    ang = torch.rand(1, 3, 1, 4) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    y = fused.rope_reference(x, cos, sin)
    norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(norm(y), norm(x))
    torch.testing.assert_close(y[..., 0], x[..., 0] * ang[..., 0].cos() - x[..., 4] * ang[..., 0].sin())


cuda = pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="the kernels need CUDA")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 4096), (3, 1, 576), (2048, 8192)])
def test_rms_norm_kernel(dtype, shape):
    torch.manual_seed(1)
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), fused.rms_norm_reference(x, w, 1e-6), **_tol(dtype))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, s, heads, kv_heads, hd", [(1, 37, 32, 8, 128), (3, 5, 9, 3, 64), (2, 1, 4, 4, 16)])
def test_rope_kernel_on_views_of_the_qkv_projection(dtype, b, s, heads, kv_heads, hd):
    torch.manual_seed(2)
    qkv = torch.randn(b, s, (heads + 2 * kv_heads) * hd, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q, k = q.view(b, s, heads, hd), k.view(b, s, kv_heads, hd)  # strided views, as the layer makes them
    ang = torch.rand(b, s, 1, hd // 2, device="cuda") * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    for x in (q, k):
        torch.testing.assert_close(fused.rope(x, cos, sin), fused.rope_reference(x, cos, sin), **_tol(dtype))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5, 2 * 14336), (300, 2 * 96)])
def test_silu_mul_kernel(dtype, shape):
    torch.manual_seed(3)
    u = torch.randn(shape, device="cuda", dtype=dtype) * 4
    torch.testing.assert_close(fused.silu_mul(u), fused.silu_mul_reference(u), **_tol(dtype))

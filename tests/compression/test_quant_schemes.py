"""Weight quantisation schemes one matrix at a time: rounding error bounds, the dispatching `linear` against a
float reference, the exactness of the int8 product, SmoothQuant's fold, AWQ's search, and refusals."""
import pytest
import torch
import torch.nn.functional as F

from flexserve.compression.layer_quant import quantize_layer
from flexserve.compression.linear import (int8_matmul, linear, quantize_fp8_per_token, quantize_int8_per_token)
from flexserve.compression.qweight import FP8_DTYPE, Fp8Weight, Int4Weight, Int8Weight
from flexserve.compression.schemes import QuantConfig, fake_quantize, quantize
from flexserve.compression.smoothing import awq_scales, smoothquant_scales
from flexserve.config import ModelConfig
from flexserve.errors import PolicyError


def _matrix(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.1


def test_fp8_weight_rounding_is_within_e4m3_precision():
    w = _matrix()
    q = quantize("fp8", w)
    assert isinstance(q, Fp8Weight) and q.weight.dtype == FP8_DTYPE and q.scale.shape == (48, 1)
    err = (q.dequantize(torch.float32) - w).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 of the value, plus the subnormal step of the row
    bound = w.abs() * 2.0 ** -4 + q.scale * 2.0 ** -9
    assert (err <= bound + 1e-7).all()
    assert q.nbytes < w.nbytes / 3.5


def test_int8_weight_rounding_is_half_a_step_per_channel():
    w = _matrix()
    q = quantize("int8", w)
    assert isinstance(q, Int8Weight) and q.weight.dtype == torch.int8
    err = (q.dequantize(torch.float32) - w).abs()
    assert (err <= q.scale / 2 * (1 + 1e-5)).all()
    assert (q.weight.abs() <= 127).all() and (q.weight.abs().amax(dim=1) == 127).all()  # each row uses the range


@pytest.mark.parametrize("group_size", [32, 128])
def test_rtn4_rounding_is_half_a_step_per_group(group_size):
    w = _matrix()
    q = quantize("rtn4", w, group_size)
    assert isinstance(q, Int4Weight) and q.group_size == group_size and q.shape == w.shape
    groups = w.view(48, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # [N, G]
    err = (q.dequantize(torch.float32) - w).view(48, -1, group_size).abs()
    assert (err <= step[..., None] / 2 + 1e-6).all()
    assert q.nbytes == 48 * 256 // 2 + 2 * 48 * (256 // group_size) * 4  # packed nibbles + fp32 scale, min


@pytest.mark.parametrize("scheme, tol", [("fp8", 0.08), ("int8", 0.03), ("rtn4", 0.15), ("awq", 0.15)])
def test_linear_is_close_to_the_float_product(scheme, tol):
    w, b = _matrix(), torch.randn(48) * 0.1
    x = torch.randn(3, 5, 256)
    want = F.linear(x, w, b)
    got = linear(x, quantize(scheme, w, 64), b)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert (got - want).norm() < tol * want.norm()
    # and it is exactly the product with the dequantised weight for the weight-only schemes
    if scheme in ("rtn4", "awq"):
        torch.testing.assert_close(got, F.linear(x, quantize(scheme, w, 64).dequantize(x.dtype), b))


def test_fp8_linear_uses_per_token_rounded_activations():
    w, x = _matrix(), torch.randn(7, 256)
    q = quantize("fp8", w)
    xq, xs = quantize_fp8_per_token(x)
    want = (xq.float() * xs) @ q.dequantize(torch.float32).t()
    torch.testing.assert_close(linear(x, q), want, rtol=1e-5, atol=1e-5)


def test_int8_matmul_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (9, 4096), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 4096), generator=g, dtype=torch.int8)
    want = a.long() @ w.long().t()  # exact in int64
    got = int8_matmul(a, w)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)


def test_int8_linear_is_the_integer_product_rescaled():
    w, x = _matrix(), torch.randn(4, 256)
    q = quantize("int8", w)
    xq, xs = quantize_int8_per_token(x)
    want = (xq.long() @ q.weight.long().t()).double() * xs.double() * q.scale.t().double()
    torch.testing.assert_close(linear(x, q).double(), want, rtol=1e-6, atol=1e-6)


def _cfg(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                num_kv_heads=2, max_position=64)
    return ModelConfig(**{**base, **kw})


def _layer(cfg: ModelConfig, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, i = cfg.hidden_size, cfg.intermediate_size
    qkv_rows = cfg.q_size + 2 * cfg.kv_size
    up_rows = 2 * i if cfg.gated_mlp else i
    w = {"qkv.weight": torch.randn(qkv_rows, d, generator=g) * 0.2, "o.weight": torch.randn(d, cfg.q_size, generator=g) * 0.2,
         "up.weight": torch.randn(up_rows, d, generator=g) * 0.2, "down.weight": torch.randn(d, i, generator=g) * 0.2,
         "attn_norm.weight": torch.rand(d, generator=g) + 0.5, "mlp_norm.weight": torch.rand(d, generator=g) + 0.5}
    if cfg.norm == "layernorm":
        w["attn_norm.bias"] = torch.randn(d, generator=g) * 0.1
        w["mlp_norm.bias"] = torch.randn(d, generator=g) * 0.1
        w["up.bias"] = torch.randn(up_rows, generator=g) * 0.1
    return w


def _layer_output(cfg, w, x):
    from flexserve.models.attention import attend_over
    from flexserve.models.layers import decoder_layer, rope_cos_sin, rope_inv_freq

    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    rope = rope_cos_sin(rope_inv_freq(cfg), pos, x.dtype) if cfg.positional == "rope" else None
    attend = lambda q, k, v: attend_over(q, k.transpose(1, 2), v.transpose(1, 2), None, causal=True)  # noqa: E731
    return decoder_layer(cfg, w, x, rope, attend)



@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothing_folds_leave_the_float_layer_unchanged(monkeypatch, family):
    """With rounding switched off, the smoothed layer (scales folded into norms and up's rows, the rest kept as
    activation divisors) computes what the original layer computes."""
    import flexserve.compression.layer_quant as lq

    cfg = _cfg() if family == "llama" else _cfg(family="opt", norm="layernorm", activation="relu",
                                                 gated_mlp=False, positional="learned")
    w = {k: v.double() for k, v in _layer(cfg).items()}
    x = torch.randn(2, 6, cfg.hidden_size, dtype=torch.float64)
    inputs = {"qkv": torch.randn(12, 32).double() * 3, "o": torch.randn(12, 32).double(),
              "up": torch.randn(12, 32).double() * 2, "down": torch.randn(12, 48).double() * 5}
    monkeypatch.setattr(lq, "quantize", lambda scheme, weight, group_size, smooth=None:
                        weight if smooth is None else weight / smooth)
    smoothed = quantize_layer(cfg, w, QuantConfig("int8"), inputs)
    assert not torch.equal(smoothed["attn_norm.weight"], w["attn_norm.weight"])  # a fold did happen
    assert not torch.equal(smoothed["up.weight"], w["up.weight"])
    torch.testing.assert_close(_layer_output(cfg, smoothed, x), _layer_output(cfg, w, x), rtol=1e-10, atol=1e-10)


def test_smoothquant_scales_balance_the_channel_ranges():
    act = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([[1.0, 1.0, 1.0], [0.5, 4.0, 1.0]])
    s = smoothquant_scales(act, w, alpha=0.5)
    torch.testing.assert_close(act / s, w.abs().amax(0) * s)  # alpha 0.5: equal ranges after smoothing


def test_awq_beats_round_to_nearest_on_outlier_channels():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = torch.randn(512, 256, generator=g)
    x[:, ::37] *= 30  # a few input channels carry much larger activations (as in real LLMs)
    ref = x @ w.t()
    rtn_err = (x @ fake_quantize("rtn4", w, 128).t() - ref).pow(2).mean()
    s = awq_scales(x, w, 128)
    awq_w = quantize("awq", w * s, 128, smooth=s)
    awq_err = (linear(x, awq_w) - ref).pow(2).mean()
    assert awq_err < 0.7 * rtn_err


def test_quantize_layer_leaves_norms_alone_without_calibration():
    cfg = _cfg()
    w = _layer(cfg)
    out = quantize_layer(cfg, w, QuantConfig("rtn4", group_size=16))
    assert all(isinstance(out[f"{n}.weight"], Int4Weight) for n in ("qkv", "o", "up", "down"))
    assert out["attn_norm.weight"] is w["attn_norm.weight"]


@pytest.mark.parametrize("kw, msg", [
    (dict(scheme="int4"), "--quantization must be one of"),
    (dict(scheme="fp8", group_size=64), "applies to the 4-bit schemes"),
    (dict(scheme="awq", group_size=7), "even integer"),
    (dict(scheme="int8", smooth_alpha=1.5), "alpha"),
])
def test_bad_quant_config_is_refused_clearly(kw, msg):
    with pytest.raises(PolicyError, match=msg):
        QuantConfig(**kw)


@pytest.mark.parametrize("width", [256, 288])  # 288: four whole groups of 64 and a last one of 32
def test_awq_clipping_lowers_the_error_on_heavy_tailed_weights(width):
    from flexserve.compression.smoothing import awq_clip

    torch.manual_seed(5)
    w = torch.distributions.StudentT(2.0).sample((64, width)) * 0.02  # a few large weights per group
    x = torch.randn(256, width)
    ref = x @ w.t()
    err = lambda m: float((x @ fake_quantize("rtn4", m, 64).t() - ref).pow(2).mean())  # noqa: E731
    clipped = awq_clip(x, w, 64)
    assert clipped.shape == w.shape and (clipped.abs() <= w.abs()).all() and not torch.equal(clipped, w)
    assert err(clipped) < 0.97 * err(w)  # the search minimises this very error; r = 1 is a candidate
    tail = slice(width // 64 * 64, width)  # the short last group is searched too
    if width % 64:
        assert not torch.equal(clipped[:, tail], w[:, tail])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU matmuls need CUDA")
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
def test_gpu_products_equal_the_cpu_emulation(scheme, rows):
    """torch._scaled_mm (fp8, compute capability 8.9+) and torch._int_mm (int8) against the CPU path's math on
    the same rounded operands: int8 exactly up to the final rescale, fp8 to bf16 output rounding."""
    w, x = _matrix(512, 1024), torch.randn(rows, 1024)
    q = quantize(scheme, w)
    want = linear(x, q)
    got = linear(x.cuda().bfloat16(), q.to("cuda")).float().cpu()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())

"""An AWQ checkpoint's 4-bit numbers as an `Int4Weight`: the packing, exact rebuilds, refusals."""
import pytest
import torch

from flexserve.compression.awq_checkpoint import awq_checkpoint_weight
from flexserve.compression.linear import linear
from flexserve.compression.qweight import Int4Weight
from flexserve.errors import ModelLoadError


def numbers(n: int = 24, k: int = 256, group: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)  # [N, K]
    z = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)  # [N, K/G]
    s = (torch.rand(n, k // group, generator=gen) * 0.05 + 1e-3).half()  # [N, K/G]
    return q, z, s


def formula(q, z, s) -> torch.Tensor:
    group = q.shape[1] // z.shape[1]
    return (q.float() - z.float().repeat_interleave(group, 1)) * s.float().repeat_interleave(group, 1)


@pytest.mark.parametrize("group", [32, 128])
def test_rebuilds_equal_the_formula_bit_for_bit(group):
    q, z, s = numbers(group=group)
    w = awq_checkpoint_weight(q, z, s)
    assert isinstance(w, Int4Weight) and w.group_size == group and w.shape == (24, 256)
    assert w.scale.dtype == torch.float16 and w.min.dtype == torch.float32  # -z * s kept exact
    want = formula(q, z, s)
    assert torch.equal(w.dequantize(torch.float32).view(torch.int32), want.view(torch.int32))
    assert torch.equal(w.dequantize(torch.float16), want.half())  # one rounding, from the exact value
    assert torch.equal(w.dequantize(torch.bfloat16), want.bfloat16())
    x = torch.randn(3, 256)
    assert torch.equal(linear(x, w), x @ want.t())


def test_levels_are_packed_in_int4weights_nibble_order():
    q, z, s = numbers(n=2, k=64, group=32)
    w = awq_checkpoint_weight(q, z, s)
    assert w.data.shape == (2, 2, 16) and w.data.dtype == torch.uint8
    assert torch.equal(w.data & 0xF, q.reshape(2, 2, 32)[..., :16])  # value j in the low nibble of byte j
    assert torch.equal(w.data >> 4, q.reshape(2, 2, 32)[..., 16:])  # value j + 16 in its high nibble
    assert torch.equal(w.min[..., 0], -(z.float() * s.float()))
    assert w.nbytes == 2 * 2 * (16 + 2 + 4)


def test_numbers_that_do_not_make_4bit_groups_are_refused():
    q, z, s = numbers(n=4, k=64, group=32)
    with pytest.raises(ModelLoadError, match="do not make groups of one even size"):
        awq_checkpoint_weight(q[:, :63], z, s)
    with pytest.raises(ModelLoadError, match="do not make groups of one even size"):
        awq_checkpoint_weight(q, z, s[:3])
    with pytest.raises(ModelLoadError, match=r"4-bit values in \[0, 15\]"):
        awq_checkpoint_weight(q + 16, z, s)

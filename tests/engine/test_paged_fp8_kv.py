"""The serving engine's paged pools stored as e4m3 (`--kv-cache-dtype fp8`): new tokens are written saturated,
attention reads them upcast (portable gather path here, the Triton kernel on a GPU), and swaps move the bytes
between the device and host pools unchanged."""
import random

import pytest
import torch

from flexserve.compression.kv import kv_storage_dtype
from flexserve.config import ModelConfig
from flexserve.engine.paged import PagedKV
from flexserve.engine.paged_batch import PagedBatch, SeqChunk, paged_attend

FP8 = torch.float8_e4m3fn


def _scenario(device, block=4, num_blocks=64, seed=0, hd=16):
    """Decode rows and prompt chunks over scattered block tables, random pools and new q/k/v."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for start, n in [(20, 1), (0, 1), (37, 1), (0, 9), (13, 6)]:
        table = [free.pop() for _ in range(-(-(start + n) // block))]
        seqs.append(SeqChunk([rng.randrange(50) for _ in range(n)], start, table, True))
    batch = PagedBatch.build(seqs, block, torch.device(device))
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2, num_blocks * block, 2, hd, generator=g).to(device)
    t = batch.slots.numel()
    q, k, v = (torch.randn(1, t, h, hd, generator=g).to(device) for h in (4, 2, 2))
    return batch, pool, q, k, v


def test_fp8_pool_attends_close_to_the_float_pool():
    batch, pool, q, k, v = _scenario("cpu")
    want = paged_attend(pool.clone(), batch)(q, k, v)
    pool8 = pool.to(FP8)
    got = paged_attend(pool8, batch)(q, k, v)
    assert got.dtype == q.dtype and pool8.dtype == FP8
    assert torch.equal(pool8[0][batch.slots].float(), k[0].to(FP8).float())  # the new keys, rounded to e4m3
    assert 0 < (got - want).norm() < 0.05 * want.norm()


def test_fp8_writes_saturate_instead_of_overflowing():
    batch, pool, q, k, v = _scenario("cpu")
    pool8 = pool.to(FP8)
    paged_attend(pool8, batch)(q, k * 1000, v)
    stored = pool8[0][batch.slots].float()
    assert torch.isfinite(stored).all() and stored.abs().max() == 448


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_fp8_pool_swaps_move_the_bytes_unchanged(device):
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, max_position=128)
    kv = PagedKV(cfg, torch.device(device), kv_storage_dtype("fp8", torch.float32), num_gpu_blocks=10,
                 num_cpu_blocks=12, block_size=4)
    assert kv.gpu.dtype == FP8 and PagedKV.bytes_per_block(cfg, 4, FP8) * 4 == PagedKV.bytes_per_block(
        cfg, 4, torch.float32)
    kv.gpu.copy_(torch.randn(kv.gpu.shape).to(FP8))
    before = kv.gpu.float().clone()
    kv.swap([(7, 3), (1, 4)], [], wait=True)
    kv.gpu.view(torch.uint8).zero_()
    kv.swap([], [(3, 0), (4, 9)], wait=True)
    assert torch.equal(kv.gpu[:, :, 0].float(), before[:, :, 7]) and torch.equal(kv.gpu[:, :, 9].float(),
                                                                                   before[:, :, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_reads_an_fp8_pool_as_the_gather_path_does(dtype):
    from flexserve.engine.paged_batch import _gather_attend

    from flexserve.kernels.paged_attention import kernel_available

    batch, pool, q, k, v = _scenario("cuda", block=16, num_blocks=16, hd=64)
    pool8 = pool.to(FP8)
    q = q.to(dtype)
    assert kernel_available(q)
    got = paged_attend(pool8, batch)(q, k.to(dtype), v.to(dtype))[0]  # writes k, v, then the kernel
    want = _gather_attend(pool8, batch, q)[0]
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

"""Block swaps between the device pool ([L, 2, blocks, ...]) and the block-major pinned host pool move every
layer of each block exactly, whatever the order and spacing of the block ids (the CPU path here; on a GPU the
same pairs take the copy stream, and test_serving's copy-stream test checks whole generations)."""
import pytest
import torch

from flexserve.config import ModelConfig
from flexserve.engine.paged import PagedKV, _runs


def _kv(device: str) -> PagedKV:
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, max_position=128)
    return PagedKV(cfg, torch.device(device), torch.float32, num_gpu_blocks=10, num_cpu_blocks=12, block_size=4)


def test_runs_coalesce_consecutive_host_blocks():
    assert list(_runs([2, 3, 4, 7, 9, 10])) == [(0, 3, 2), (3, 4, 7), (4, 6, 9)]
    assert list(_runs([5])) == [(0, 1, 5)]


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_swap_out_then_in_restores_every_layer_of_every_block(device):
    kv = _kv(device)
    kv.gpu.copy_(torch.randn(kv.gpu.shape))
    before = kv.gpu.clone()
    out = [(7, 3), (1, 4), (4, 0), (2, 11)]  # gpu -> cpu, unsorted, with gaps and a run (3, 4)
    kv.swap(out, [], wait=True)
    for g, c in out:
        assert torch.equal(kv.cpu[c].to(device), before[:, :, g])
    kv.gpu.zero_()
    back = [(3, 9), (11, 0), (0, 5), (4, 2)]  # cpu -> other gpu blocks
    kv.swap([], back, wait=True)
    source = {c: g for g, c in out}
    for c, g in back:
        assert torch.equal(kv.gpu[:, :, g], before[:, :, source[c]])
    untouched = [b for b in range(kv.gpu.shape[2]) if b not in {g for _, g in back}]
    assert kv.gpu[:, :, untouched].abs().sum() == 0


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_copies_left_in_flight_are_ordered_before_later_compute_and_swaps(device):
    """The engine's pattern: a swap-out ahead of need left in flight, the next step's swap-in of the same host
    blocks into other device blocks, compute ordered after it, then the first blocks overwritten."""
    kv = _kv(device)
    kv.gpu.copy_(torch.randn(kv.gpu.shape))
    before = kv.gpu.clone()
    mark = kv.mark()
    kv.swap([(1, 6), (2, 7), (5, 8)], [], wait=False, after=mark)  # ahead of need: not waited for
    kv.finish_pending()  # the next step: later compute is ordered after those copies
    kv.gpu[:, :, [1, 2, 5]] = 0  # that compute reuses the freed device blocks
    kv.swap([], [(6, 3), (7, 4), (8, 9)], wait=False)  # the same host blocks come back elsewhere
    kv.order_before_compute()
    got = kv.gpu[:, :, [3, 4, 9]].clone()  # read on the compute stream
    kv.finish_pending(sync=True)
    assert torch.equal(got, before[:, :, [1, 2, 5]])

"""The memory check before a block counts weights already placed as this process's own memory."""
import pytest
import torch

from flexserve.config import preset
from flexserve.errors import PolicyError
from flexserve.offload import budget
from flexserve.offload.policy import Policy

GIB = 1 << 30


def test_placed_weights_are_not_counted_twice(monkeypatch):
    cfg = preset("llama-3-70b")
    policy = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=16, num_gpu_batches=2)
    w = budget.weight_bytes(cfg, policy, 2)
    # After placing ~131 GiB of weights in host memory, 40 GiB is still free: the block's cache fits there.
    monkeypatch.setattr(budget, "available", lambda device: budget.TierBytes(70 * GIB, 40 * GIB, 0))
    budget.check_fits(cfg, policy, 2, 520, torch.device("cuda"), weights_placed=True)
    with pytest.raises(PolicyError, match="needs .* on the CPU"):  # before placement the same free memory is short
        budget.check_fits(cfg, policy, 2, 520, torch.device("cuda"))
    # A cap still bounds weights plus cache together, placed or not.
    with pytest.raises(PolicyError, match="on the CPU"):
        budget.check_fits(cfg, policy, 2, 520, torch.device("cuda"), cpu_limit=w.cpu - GIB, weights_placed=True)
    # And a cache that does not fit what is left is still refused.
    monkeypatch.setattr(budget, "available", lambda device: budget.TierBytes(70 * GIB, 0, 0))
    big = Policy.from_percent((0, 100, 0, 100, 100, 0), gpu_batch_size=64, num_gpu_batches=4)
    with pytest.raises(PolicyError, match="KV cache"):
        budget.check_fits(cfg, big, 2, 4096, torch.device("cuda"), weights_placed=True)

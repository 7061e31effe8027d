"""Shared checks for the compression tests."""
import math

import pytest
import torch


def group_stats(x: torch.Tensor, group_dim: int, group_size: int):
    """Per-element (group max - group min, group max |x|), grouped independently of the library."""
    x_last = x.float().movedim(group_dim, -1)  # [*lead, n]
    n = x_last.shape[-1]
    num_groups = math.ceil(n / group_size)
    index = (torch.arange(n) // group_size).expand_as(x_last)
    init = x_last.new_zeros((*x_last.shape[:-1], num_groups))
    g_max = init.scatter_reduce(-1, index, x_last, "amax", include_self=False)
    g_min = init.scatter_reduce(-1, index, x_last, "amin", include_self=False)
    g_abs = init.scatter_reduce(-1, index, x_last.abs(), "amax", include_self=False)
    return (g_max - g_min).gather(-1, index), g_abs.gather(-1, index)


def assert_within_bound(x, y, config, scale_dtype=None):
    """|x - y| <= (max - min) / (2**bits - 1) / 2 + eps, eps a few ulps of the group's magnitude."""
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    group_dim = config.group_dim % x.dim()
    g_range, g_abs = group_stats(x, group_dim, config.group_size)
    ulp = max(torch.finfo(x.dtype).eps, torch.finfo(scale_dtype or x.dtype).eps)
    # output rounding plus (for a narrower scale dtype) the scale's rounding times 2**bits - 1
    eps = 2 * ulp * g_abs + config.max_level * ulp * g_range + 1e-30
    bound = g_range / config.max_level / 2 + eps
    error = (x.float() - y.float()).movedim(group_dim, -1)
    assert (error.abs() <= bound).all(), f"max excess {(error.abs() - bound).max().item()}"


@pytest.fixture
def within_bound():
    """The documented error-bound check, as a fixture so every test module can use it."""
    return assert_within_bound

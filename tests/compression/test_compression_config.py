"""CompressionConfig validation: every bad setting is a PolicyError."""
import pytest
import torch

from flexserve.compression import CompressionConfig, compress
from flexserve.errors import PolicyError


def test_defaults_are_4bit_groups_of_64_along_last_dim():
    config = CompressionConfig()
    assert (config.num_bits, config.group_size, config.group_dim) == (4, 64, -1)
    assert config.max_level == 15


@pytest.mark.parametrize("kwargs", [
    {"num_bits": 3}, {"num_bits": 16}, {"num_bits": True}, {"num_bits": 4.0},
    {"group_size": 0}, {"group_size": -64}, {"group_size": 2.5}, {"group_size": True},
    {"num_bits": 4, "group_size": 33},
    {"group_dim": 1.0}, {"group_dim": None},
    {"scale_dtype": torch.int8}, {"scale_dtype": torch.float64},
])
def test_bad_configs_raise_policy_error(kwargs):
    with pytest.raises(PolicyError):
        CompressionConfig(**kwargs)


def test_odd_group_size_is_fine_for_8bit():
    assert CompressionConfig(num_bits=8, group_size=33).group_size == 33


def test_group_dim_out_of_range_for_tensor_raises_policy_error():
    with pytest.raises(PolicyError):
        compress(torch.zeros(4, 64), CompressionConfig(group_dim=2))
    with pytest.raises(PolicyError):
        compress(torch.zeros(4, 64), CompressionConfig(group_dim=-3))


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        CompressionConfig().num_bits = 8

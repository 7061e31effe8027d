"""Tensor and pipeline parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs), launched by torchrun.

`tensor` shards layer weights, `groups` places a rank in the tp x pp grid, `pipeline` runs a rank's stage,
`launch` is the Python API and the command, `cost` the communication term for the planner. See
docs/PARALLEL.md.
"""
from __future__ import annotations

from .cost import comm_time
from .groups import Layout, check_degrees, stage_bounds
from .launch import add_parallel_arguments, parallel_generate, run_parallel_generate
from .tensor import check_tensor_parallel, shard_config, shard_layer

__all__ = ["Layout", "add_parallel_arguments", "check_degrees", "check_tensor_parallel", "comm_time",
           "parallel_generate", "run_parallel_generate", "shard_config", "shard_layer", "stage_bounds"]

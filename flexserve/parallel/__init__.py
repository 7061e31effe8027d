"""Tensor and pipeline parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs), launched by torchrun.

`tensor` shards layer weights, `groups` places a rank in the tp x pp grid, `pipeline` runs a rank's stage,
`serving` is the group the serving engine drives, `launch` the offline Python API (`parallel_generate`) and
`cost` the communication term for the planner. See docs/PARALLEL.md.

Importing the package loads only the light modules (sharding rules, the grid, the cost term), which the planner
uses: `parallel_generate` brings in the pipeline and the offloading executor when first asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cost import comm_time
from .groups import Layout, check_degrees, stage_bounds
from .tensor import check_tensor_parallel, shard_config, shard_layer

if TYPE_CHECKING:
    from .launch import parallel_generate

__all__ = ["Layout", "check_degrees", "check_tensor_parallel", "comm_time", "parallel_generate", "shard_config",
           "shard_layer", "stage_bounds"]


def __getattr__(name: str):
    if name == "parallel_generate":
        from .launch import parallel_generate

        return parallel_generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

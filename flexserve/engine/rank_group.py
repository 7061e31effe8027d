"""What the serving engine needs of a tensor/pipeline parallel group, as protocols.

The group itself (`flexserve.parallel.serving.ServingGroup`, on torch.distributed) belongs to the parallel
layer, which sits above the engine: the pipeline stages run the engine's generation loop. So the engine never
imports it. Whoever builds a parallel engine passes the group's constructor as `EngineConfig.join_group`
(`flexserve serve -tp/-pp` does); the engine calls it once its model's shape and device are known.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..config import ModelConfig
from ..weights import WeightSource


class GridPlace(Protocol):
    """Where this rank sits in the tensor x pipeline grid."""

    tp: int
    pp: int
    rank: int

    @property
    def is_first(self) -> bool: ...


class RankGroup(Protocol):
    """This process's place in a serving group and the messages one engine step exchanges."""

    layout: GridPlace

    @property
    def is_driver(self) -> bool:
        """Rank 0: the one that schedules, samples and serves HTTP."""

    def device(self, requested: torch.device) -> torch.device:
        """The device this rank computes on, given the one asked for."""

    def shard(self, source: WeightSource) -> WeightSource:
        """This rank's stage of layers, its heads and MLP columns of each."""

    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The all-reduce of the row-parallel projections (None without tensor parallelism)."""

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value`."""

    def broadcast_plan(self, plan: object) -> object:
        """Rank 0 sends a step's plan; every other rank receives and returns it."""

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Stage > 0: the previous stage's hidden states."""

    def pass_on(self, x: torch.Tensor, sample_rows: torch.Tensor) -> None:
        """After this stage's layers: to the next stage, or the rows to sample to rank 0."""

    def recv_sampled(self, num_rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rank 0: the last stage's hidden states of the rows to sample."""

    def leave(self) -> None:
        """Tear the group down in order."""

    def abort(self) -> None:
        """Tear the group down without a matching collective, after a failure mid-step."""


# (tensor_parallel, pipeline_parallel, the full model's config, the device asked for) -> the joined group
JoinGroup = Callable[[int, int, ModelConfig, torch.device], RankGroup]

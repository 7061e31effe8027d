"""Where a rank sits in the tensor x pipeline grid, and the process groups it talks through.

Ranks are laid out stage-major: rank = stage * tp + tp_rank, so the tensor-parallel ranks of one stage are
neighbours (on one node when `--nproc-per-node` is a multiple of tp: all-reduces, the chatty traffic, stay on
NVLink) and only the pipeline hops, one activation per micro-batch, cross nodes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import PolicyError
from .tensor import check_tensor_parallel


@dataclass(frozen=True)
class Layout:
    """One rank's coordinates in a grid of `pp` pipeline stages, each `tp` tensor-parallel ranks wide."""

    tp: int
    pp: int
    rank: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise PolicyError(f"parallel degrees must be >= 1, got tensor {self.tp}, pipeline {self.pp}")
        if not 0 <= self.rank < self.world_size:
            raise PolicyError(f"rank {self.rank} is outside a grid of {self.world_size} processes")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    @property
    def sampler_rank(self) -> int:
        """The rank whose greedy tokens every rank adopts (last stage, first tensor rank)."""
        return self.rank_of(self.pp - 1, 0)


def check_degrees(cfg: ModelConfig, tp: int, pp: int, world_size: int) -> None:
    """Raise a clear `PolicyError` for a grid that cannot run this model on this many processes."""
    if tp < 1 or pp < 1:
        raise PolicyError(f"--tensor-parallel and --pipeline-parallel must be >= 1, got {tp} and {pp}")
    if tp * pp != world_size:
        raise PolicyError(f"--tensor-parallel {tp} x --pipeline-parallel {pp} needs {tp * pp} processes, but "
                          f"{world_size} were started (torchrun --nproc-per-node x --nnodes)")
    if pp > cfg.num_layers:
        raise PolicyError(f"pipeline parallel {pp} is more stages than the model's {cfg.num_layers} layers")
    check_tensor_parallel(cfg, tp)


def stage_bounds(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Decoder layers [lo, hi) of `stage`: contiguous, sizes differing by at most one (early stages larger)."""
    base, extra = divmod(num_layers, pp)
    lo = stage * base + min(stage, extra)
    return lo, lo + base + (1 if stage < extra else 0)


@dataclass
class Groups:
    """The process groups of one rank: its stage's tensor-parallel group (None when tp == 1)."""

    layout: Layout
    tp_group: object = None


def make_groups(layout: Layout) -> Groups:
    """Create every stage's tensor-parallel group; all ranks must call this, in the same order."""
    import torch.distributed as dist

    if layout.tp == 1:
        return Groups(layout)
    if layout.pp == 1:
        return Groups(layout, dist.group.WORLD)
    mine = None
    for stage in range(layout.pp):  # new_group is collective: every rank creates every group
        g = dist.new_group([layout.rank_of(stage, t) for t in range(layout.tp)])
        if stage == layout.stage:
            mine = g
    return Groups(layout, mine)


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """This process's compute device: cuda:LOCAL_RANK when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout=None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world size).

    By default NCCL when CUDA is available (one GPU per process, chosen by LOCAL_RANK), gloo on the CPU.
    `timeout` (a timedelta) bounds every collective; None keeps torch's default."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PolicyError("not started by torchrun: run `torchrun --nproc-per-node N -m flexserve.parallel.generate "
                          "...` (RANK / WORLD_SIZE are unset)")
    backend = backend or backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    return dist.get_rank(), dist.get_world_size()

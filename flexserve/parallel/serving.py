"""Tensor parallelism for the serving engine: one scheduler on rank 0, the same forward on every rank.

Rank 0 runs the HTTP server, the scheduler and the block manager. Each step it broadcasts the step's plan
(the scheduled token chunks with their block tables, and the block swaps) to the other ranks of the group;
every rank then swaps its own shard of the KV pools and runs the forward on its shard of the weights, the
row-parallel projections summed by all-reduces inside the layers. The LM head is replicated, so rank 0 alone
samples. Block ids mean the same on every rank because every rank's pools have the same number of blocks
(the smallest that fits on every rank). A `None` plan ends the workers.

Why broadcast a plan rather than run a scheduler everywhere: the scheduler reacts to arrival times and
client disconnects that only the server rank sees; one decision-maker cannot diverge.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from ..weights import WeightSource
from .groups import Groups, Layout, check_degrees, init_from_env, local_device, make_groups
from .pipeline import StageSource
from .tensor import all_reduce_fn


@dataclass
class TensorParallelGroup:
    """This process's place in the serving group and the collectives the engine needs."""

    layout: Layout
    groups: Groups
    owns_process_group: bool = False  # join() created it, so leave() destroys it

    @classmethod
    def join(cls, tp: int, config, device: torch.device) -> "TensorParallelGroup":
        """Initialise (or reuse) the process group started by torchrun and check the degree fits the model."""
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            # A server waits for requests between steps: no collective timeout should fire while it is idle.
            init_from_env("gloo" if device.type == "cpu" else None, timeout=datetime.timedelta(days=365))
        rank, world = dist.get_rank(), dist.get_world_size()
        check_degrees(config, tp, 1, world)
        layout = Layout(tp, 1, rank)
        return cls(layout, make_groups(layout), owns)

    def abort(self) -> None:
        """After a failure mid-step on rank 0: tear the group down without a matching collective, so the
        workers' pending collectives fail and they exit (torchrun then ends the job) instead of waiting."""
        import torch.distributed as dist

        self.owns_process_group = False
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # already broken: nothing more to release
            pass

    def leave(self) -> None:
        """Tear the process group down in order (a process that exits with it alive can abort in teardown)."""
        import torch.distributed as dist

        if self.owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def is_driver(self) -> bool:
        """Rank 0: the one that schedules, samples and serves HTTP."""
        return self.layout.rank == 0

    def shard(self, source: WeightSource) -> StageSource:
        return StageSource(source, self.layout)

    def reduce(self):
        return all_reduce_fn(self.groups.tp_group)

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank (cuda:LOCAL_RANK); a CPU stays the CPU."""
        return local_device() if requested.type == "cuda" else requested

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (pool sizes must match across ranks)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.groups.tp_group)
        return int(t.item())

    def broadcast_plan(self, plan) -> object:
        """Rank 0 sends `plan`; every other rank receives and returns it."""
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=0, group=self.groups.tp_group)
        return box[0]


def exit_worker(code: int = 0) -> None:
    """End a worker rank's process now, after its engine left the group cleanly. Interpreter teardown would
    run gloo's C++ destructors, which abort the process now and then ("terminate called without an active
    exception") after a run that went fine; torchrun would then report the whole job as failed."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

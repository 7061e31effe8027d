"""Tensor and pipeline parallelism for the serving engine: one scheduler on rank 0, its plan run everywhere.

Rank 0 runs the HTTP server, the scheduler and the block manager. Each step it broadcasts the step's plan
(the scheduled token chunks with their block tables, and the block swaps) to every rank; each rank then swaps
its own share of the KV pools (its stage's layers, its tensor shard's heads) and runs its part of the forward:
- tensor parallel: the row-parallel projections are summed by all-reduces inside the layers;
- pipeline parallel: stage 0 embeds and runs its layers, each stage sends the hidden states [1, T, D] to the
  next, and the last stage sends the hidden states of the rows to sample back to rank 0, which holds the
  final norm and LM head (`ServingStageSource`) and samples.
Block ids mean the same on every rank because every rank's pools have the same number of blocks (the smallest
that fits on every rank). A `None` plan ends the workers. The stages run one after another within a step (no
micro-batches): pipeline parallelism here buys memory (a model larger than one GPU), not speed.

Why broadcast a plan rather than run a scheduler everywhere: the scheduler reacts to arrival times and
client disconnects that only the server rank sees; one decision-maker cannot diverge.

The engine never imports this module: whoever builds a parallel engine passes `ServingGroup.join` as
`EngineConfig.join_group`, and the engine uses the group through `engine.rank_group.RankGroup`.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..weights import WeightSource
from .groups import Groups, Layout, check_degrees, init_from_env, local_device, make_groups
from .pipeline import StageSource
from .tensor import all_reduce_fn

if TYPE_CHECKING:
    from ..engine.runner import StepPlan


class ServingStageSource(StageSource):
    """A stage's weights for serving: the embedding and the head both live on stage 0 (rank 0 samples)."""

    def global_parts(self) -> dict[str, torch.Tensor]:
        return dict(self.source.global_parts()) if self.layout.stage == 0 else {}


@dataclass
class ServingGroup:
    """This process's place in the serving group (tp x pp ranks) and the messages the engine needs."""

    layout: Layout
    groups: Groups
    owns_process_group: bool = False  # join() created it, so leave() destroys it

    @classmethod
    def join(cls, tp: int, pp: int, config, device: torch.device) -> "ServingGroup":
        """Initialise (or reuse) the process group started by torchrun and check the degree fits the model."""
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            # A server waits for requests between steps: no collective timeout should fire while it is idle.
            init_from_env("gloo" if device.type == "cpu" else None, timeout=datetime.timedelta(days=365))
        rank, world = dist.get_rank(), dist.get_world_size()
        check_degrees(config, tp, pp, world)
        layout = Layout(tp, pp, rank)
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
        return ServingStageSource(source, self.layout)

    def reduce(self):
        return all_reduce_fn(self.groups.tp_group) if self.layout.tp > 1 else None

    # --- pipeline messages -------------------------------------------------------------------------------------
    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Stage > 0: the previous stage's hidden states."""
        import torch.distributed as dist

        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=self.layout.rank_of(self.layout.stage - 1, self.layout.tp_rank))
        return x

    def pass_on(self, x: torch.Tensor, sample_rows: torch.Tensor) -> None:
        """After this stage's layers: to the next stage, or (last stage) the rows to sample to rank 0."""
        import torch.distributed as dist

        lay = self.layout
        if not lay.is_last:
            dist.send(x.contiguous(), dst=lay.rank_of(lay.stage + 1, lay.tp_rank))
        elif lay.tp_rank == 0 and sample_rows.numel():
            dist.send(x[0, sample_rows].contiguous(), dst=0)

    def recv_sampled(self, num_rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rank 0: the last stage's hidden states of the rows to sample [num_rows, D]."""
        import torch.distributed as dist

        h = torch.empty(num_rows, hidden, dtype=dtype, device=device)
        dist.recv(h, src=self.layout.rank_of(self.layout.pp - 1, 0))
        return h

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank (cuda:LOCAL_RANK); a CPU stays the CPU."""
        return local_device() if requested.type == "cuda" else requested

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (pool sizes must match across ranks)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan | None:
        """Rank 0 sends a step's plan (None: the end of the plans); every other rank receives and returns it.
        The plan travels pickled, so it is plain data: token ids, block tables, block pairs."""
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=0)
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

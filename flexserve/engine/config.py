"""`EngineConfig`: what a serving engine is asked to be (model, scheduler, pool sizes, placement, parallelism)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..offload.policy import Policy
from .rank_group import JoinGroup


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str | None = None
    scheduler: str = "fcfs"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int = 512
    block_size: int = 16
    num_gpu_blocks: int | None = None  # default: 85% of free device memory after weights (1 GiB on a CPU)
    num_cpu_blocks: int | None = None  # default: 4 GiB of pinned host memory (1 GiB on a CPU)
    max_queue_len: int = 1024
    seed: int = 0
    policy: Policy | None = None  # weight placement (None: resident); the KV cache is always paged
    offload_dir: str | None = None
    scheduler_options: dict = field(default_factory=dict)  # extra SchedulerConfig fields
    cuda_graphs: bool = True  # replay decode-only steps as CUDA graphs (when the weights are resident on a GPU)
    tensor_parallel: int = 1  # ranks of a torchrun group that split every layer (flexserve.parallel.serving)
    pipeline_parallel: int = 1  # stages of contiguous layers, one rank group each
    join_group: JoinGroup | None = None  # how to join that group: `ServingGroup.join` (see rank_group.py)

    @property
    def parallel(self) -> bool:
        """Whether the engine spans a torchrun group (tensor or pipeline parallel)."""
        return self.tensor_parallel > 1 or self.pipeline_parallel > 1

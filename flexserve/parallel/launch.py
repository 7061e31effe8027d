"""`parallel_generate`: greedy generation on every rank of a tensor x pipeline process group.

The command that runs it under torchrun (`flexserve generate -tp/-pp`, `python -m flexserve.parallel.generate`)
is `flexserve.cli.parallel`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .groups import Groups, Layout, check_degrees, local_device, make_groups
from .pipeline import PipelineRunner


def parallel_generate(model: str | None, prompts_token_ids: Sequence[Sequence[int]], max_tokens: int,
                      tensor_parallel: int = 1, pipeline_parallel: int = 1, dtype: str | torch.dtype = "auto",
                      device: str | torch.device | None = None, num_micro_batches: int | None = None,
                      stop_token_ids: Sequence[int] = (), policy=None,
                      offload_dir: str | None = None) -> list[list[int]]:
    """Greedy token ids for every prompt, on every rank of an initialised process group (collective).

    The group must hold exactly tensor_parallel x pipeline_parallel ranks; without an initialised group the
    degrees must be 1 and this runs in the calling process. `model` is what `open_source` takes. `policy`
    (weight percentages, --compress-weight) places each stage's own layers on its GPU, CPU and disk."""
    import torch.distributed as dist

    from ..models.loading import open_model

    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    opened = open_model(model, dtype, local_device() if device is None or str(device) == "cuda" else device)
    check_degrees(opened.config, tensor_parallel, pipeline_parallel, world)
    layout = Layout(tensor_parallel, pipeline_parallel, rank)
    groups = make_groups(layout) if world > 1 else Groups(layout)
    runner = PipelineRunner(opened.source, groups, opened.device, opened.dtype, policy, offload_dir)
    try:
        prompts = [[int(t) for t in p] for p in prompts_token_ids]
        if not prompts:
            return []
        return runner.generate(prompts, max_tokens, num_micro_batches, frozenset(int(t) for t in stop_token_ids))
    finally:
        runner.close()

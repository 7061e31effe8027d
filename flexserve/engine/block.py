"""Generation on the offloading executor: one block of sequences through the zig-zag schedule.

Every sequence of the block shares one cache length (prompts are left-padded to the block's longest), so one
forward per step serves all GPU batches of the block, which is what the zig-zag schedule needs. The loop
itself, sampling and stopping are `generation.py`'s.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..offload.executor import BlockState, OffloadExecutor
from .generation import Block, Sequence, generate


class BlockStepper:
    """A generation step on the executor: one forward over every batch of the block, then each batch's tokens.
    The prefill also scores the prompt positions when a sequence asked for prompt log-probabilities."""

    def __init__(self, ex: OffloadExecutor, state: BlockState):
        self.ex, self.state = ex, state

    def step(self, block: Block) -> None:
        feeds = block.feeds
        logits = self.ex.forward(self.state, [f.ids for f in feeds], [f.positions for f in feeds],
                                 [f.key_valid for f in feeds],
                                 all_logits=block.steps == 0 and block.wants_prompt_logprobs)
        for k, lg in enumerate(logits):
            block.take(k, lg)


def run_block(ex: OffloadExecutor, seqs: list[Sequence], gpu_batch_size: int,
              stop_check: Callable[[Sequence], bool] | None = None,
              on_step: Callable[[int], None] | None = None) -> None:
    """Generate every sequence of one block to completion, in place (`generate` describes the callbacks)."""
    block = Block([seqs[i:i + gpu_batch_size] for i in range(0, len(seqs), gpu_batch_size)], stop_check,
                  shared_length=True)
    state = ex.new_block([len(b) for b in block.batches], block.feeds[0].ids.shape[1] + block.max_new)
    try:
        generate(BlockStepper(ex, state), block, on_step)
    finally:
        ex.release_block(state)


def prompt_logits(ex: OffloadExecutor, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] at every position of one prompt, from one prefill (nothing is generated)."""
    state = ex.new_block([1], len(ids))
    try:
        return ex.forward(state, [torch.tensor([ids], dtype=torch.long)], [torch.arange(len(ids))[None]], [None],
                          all_logits=True)[0][0]
    finally:
        ex.release_block(state)

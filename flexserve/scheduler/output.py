"""Typed results of a scheduling step and of `stats()`: what the engine executes and what /metrics shows."""
from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request

BlockPair = tuple[int, int]


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: compute the KV of tokens `[start_pos, start_pos + num_tokens)` of
    `request.all_token_ids`, writing into `block_table`; sample a token only when `samples` is true (a
    prompt chunk that does not reach the prompt's end samples nothing)."""

    request: Request
    num_tokens: int
    start_pos: int
    is_prefill: bool
    samples: bool
    block_table: list[int]

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    """Decisions of one step, in the order the engine executes them.

    1. `swap_out` then `swap_out_ahead` (gpu_block, cpu_block) copies; 2. `swap_in` then `swap_in_ahead`
    (cpu_block, gpu_block) copies; 3. the forward pass over `scheduled`.
    `swap_out`/`swap_in` must complete before this step's compute (compute reuses those GPU blocks or reads
    the swapped-in job). The `*_ahead` copies make room or prefetch for later steps: they may overlap this
    step's compute, but must complete before the next step's copies or compute begin.
    `preempted`: ids that ran last step and not this one (their KV stays where it is). `recompute`: ids whose
    KV was dropped this step because host blocks ran out too; they will prefill again.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    swap_out: list[BlockPair] = field(default_factory=list)
    swap_in: list[BlockPair] = field(default_factory=list)
    swap_out_ahead: list[BlockPair] = field(default_factory=list)
    swap_in_ahead: list[BlockPair] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    recompute: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled if s.is_prefill)

    @property
    def num_decode_seqs(self) -> int:
        return sum(1 for s in self.scheduled if not s.is_prefill)

    @property
    def total_context_tokens(self) -> int:
        """KV positions attended over by the step (each sequence's context after the step's tokens)."""
        return sum(s.start_pos + s.num_tokens for s in self.scheduled)

    @property
    def num_swapped_blocks(self) -> int:
        return len(self.swap_out) + len(self.swap_in) + len(self.swap_out_ahead) + len(self.swap_in_ahead)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.num_swapped_blocks


@dataclass(frozen=True)
class SchedulerStats:
    """Counters and gauges for /metrics and for tests."""

    queue_len_per_level: list[int]
    num_waiting: int
    num_running: int
    num_preempted: int
    num_swapped: int
    num_gpu_blocks_used: int
    num_cpu_blocks_used: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    num_swap_outs: int  # requests moved to the host
    num_swap_ins: int
    num_blocks_swapped_out: int
    num_blocks_swapped_in: int
    num_recomputes: int
    num_preemptions: int
    num_demotions: int
    num_promotions: int
    num_finished: int
    num_aborted: int
    num_rejected: int
    num_iterations: int

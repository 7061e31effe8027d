"""`Request`: one generation job as the scheduler sees it.

The scheduler never splits a job into "prefill" and "decode" phases. A request has a count of tokens whose
KV cache is computed (`num_computed_tokens`) that catches up with its token count (`num_tokens` = prompt
plus outputs) under a per-step budget. A prompt is one long catch-up (in chunks); a decode step is a
catch-up of one token (the token sampled last step). A job whose KV cache was dropped (recomputation) just
has `num_computed_tokens` set back to 0 and catches up again over prompt and outputs alike.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


# An output token the engine has sampled on the device but not read yet (asynchronous scheduling): it stands in
# the request's output ids for one step, until the engine writes the real id over it.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    """Where a request is in its life. Its KV blocks live on the GPU in RUNNING/PREEMPTED, on the host in
    SWAPPED, nowhere in WAITING (not started, or dropped for recomputation) and the final states."""

    WAITING = "waiting"  # not started, or KV dropped for recomputation; holds no blocks
    RUNNING = "running"  # in the batch of the last scheduled step
    PREEMPTED = "preempted"  # started, not in the last batch; KV still on the GPU
    SWAPPED = "swapped"  # started, KV in host blocks; must be swapped in before it runs
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def is_finished(self) -> bool:
        return self in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)


@dataclass(eq=False)
class Request:
    """A job: its prompt, its budget, and the bookkeeping the policies and the metrics need.

    Give `prompt_token_ids` (a real engine) or only `prompt_len` (the simulator, which needs sizes only).
    Output tokens are appended as ids when the engine reports ids, or only counted when it reports counts;
    `num_output_tokens` is the authority either way.
    """

    request_id: str
    prompt_token_ids: list[int] | None = None
    prompt_len: int = 0
    max_tokens: int = 16
    arrival_time: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    # MLFQ state: priority level (0 is highest), iteration time used at this level, FIFO order in its level.
    level: int = 0
    quantum_used_s: float = 0.0
    quantum_iters: int = 0
    enqueue_seq: int = 0
    guarded: bool = False  # MLFQ tail guard: old enough to be served first, in arrival order, never demoted
    # Time stamps (scheduler clock, seconds). `last_scheduled_time` starts at arrival so that the wait of a
    # job that never ran counts towards starvation promotion.
    last_scheduled_time: float = math.nan
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Counters for metrics and tests.
    num_steps: int = 0
    time_scheduled_s: float = 0.0
    num_preemptions: int = 0
    num_swaps: int = 0
    num_recomputes: int = 0

    def __post_init__(self) -> None:
        if self.prompt_token_ids is not None:
            self.prompt_token_ids = list(self.prompt_token_ids)
            self.prompt_len = len(self.prompt_token_ids)
        if self.prompt_len < 1:
            raise ValueError(f"request {self.request_id!r}: the prompt needs at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}")
        if math.isnan(self.last_scheduled_time):
            self.last_scheduled_time = self.arrival_time

    # --- token accounting -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Prompt plus outputs so far: the tokens whose KV the job needs before it can sample the next."""
        return self.prompt_len + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        """The most KV slots this job can ever need (its last sampled token is never fed back)."""
        return self.prompt_len + self.max_tokens - 1

    @property
    def is_prefill(self) -> bool:
        """True while the job catches up over more than its last sampled token (prompt or recomputation)."""
        return self.num_uncomputed_tokens > 1 or self.num_computed_tokens < self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs."""
        if self.prompt_token_ids is None:
            raise ValueError(f"request {self.request_id!r} was made from a length only, it has no token ids")
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt then outputs, without joining the two lists (the engine reads each
        step's inputs from here; a decode reads one token of a long sequence)."""
        prompt = self.prompt_token_ids
        if prompt is None:
            raise ValueError(f"request {self.request_id!r} was made from a length only, it has no token ids")
        n = len(prompt)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return prompt[start:end]
        return prompt[start:] + self.output_token_ids[:end - n]

    # --- metrics helpers (seconds, scheduler clock) -------------------------------------------------------
    @property
    def jct(self) -> float | None:
        """Job completion time: arrival to last token."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for single-token jobs."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def queueing_delay(self) -> float | None:
        """Time in the system not spent inside a scheduled step: waiting, preempted or swapped."""
        jct = self.jct
        return None if jct is None else max(0.0, jct - self.time_scheduled_s)

"""`SchedulerConfig`: every knob of every policy, validated once.

One config serves all policies, so a comparison between them changes the policy name and nothing else.
The MLFQ defaults are the FastServe authors' starting values (quantum of level i = 10 ms x 2^i of iteration
time, starvation promotion of jobs idle for >= 3 s checked every 1,000 iterations) except the number of levels:
four, not eight, so a job reaches the first-come-first-served bottom queue after 70 ms of service instead of
1.27 s. Measured where KV memory limits the batch (same engine, same trace): p99 0.89x FCFS with four levels
against 1.52x with eight, at a mean of 0.28x against 0.24x; on light-tailed traces four levels is FCFS parity
(0.93-1.00x, simulated) where eight lose 4-70% (bench/RESULTS.md 4b, docs/SCHEDULER.md "Choosing the number
of levels").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits, queue bound, MLFQ shape and KV-swap behaviour.

    `max_queue_len` bounds the requests that have not started yet; `add_request` past it raises
    `QueueFullError` (HTTP 429) instead of letting memory and latency grow without bound.
    `gpu_reserve_frac` is the share of GPU blocks skip-join MLFQ keeps free for arriving jobs by swapping
    out low-priority jobs ahead of need.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    prefill_chunk_size: int = 2048  # tokens of one prompt per step; long prompts take several steps
    max_queue_len: int = 10_000
    num_levels: int = 4  # FastServe's 8 tuned down: see the module docstring
    base_quantum_s: float = 0.01
    quantum_ratio: float = 2.0
    starvation_threshold_s: float = 3.0
    starvation_check_interval: int = 1000  # iterations between starvation checks
    gpu_reserve_frac: float = 0.05
    proactive_swap_in: bool = True
    demote_to_back: bool = False  # MLFQ: a demoted job keeps its arrival order in the lower queue
    min_resident_steps: int = 4  # MLFQ: a job that ran or was swapped in this recently is evicted last
    start_margin_frac: float = 0.05  # MLFQ: share of GPU + host blocks kept free when a job starts
    max_promotions_per_check: int = 0  # skip-join: starved jobs promoted per check; 0 = max_num_seqs
    # MLFQ tail guard: a job this many seconds past its arrival is served ahead of every unguarded job, in
    # arrival order, and never demoted again (inf = off). Starvation promotion alone puts an old job back at
    # the top only until its next quantum runs out, so under overload the longest jobs keep losing their seat
    # to arrivals and the p99 JCT ends up far behind FCFS (bench/RESULTS.md section 4b: the guard trades mean JCT for it).
    tail_guard_s: float = math.inf
    tail_guard_seats: int = 0  # jobs in the tail lane at once; 0 = max_num_seqs
    tail_guard_check_interval: int = 10  # iterations between tail-guard checks

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size", "max_queue_len",
                     "num_levels", "starvation_check_interval", "tail_guard_check_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError("SchedulerConfig.max_num_batched_tokens must be >= max_num_seqs (a decode is a token)")
        if not self.base_quantum_s > 0:
            raise ConfigError(f"SchedulerConfig.base_quantum_s must be > 0, got {self.base_quantum_s}")
        if not self.quantum_ratio >= 1:
            raise ConfigError(f"SchedulerConfig.quantum_ratio must be >= 1, got {self.quantum_ratio}")
        if not self.starvation_threshold_s > 0:
            raise ConfigError("SchedulerConfig.starvation_threshold_s must be > 0 (math.inf disables it)")
        if not self.tail_guard_s > 0:
            raise ConfigError("SchedulerConfig.tail_guard_s must be > 0 (math.inf disables it)")
        if self.tail_guard_seats < 0:
            raise ConfigError(f"SchedulerConfig.tail_guard_seats must be >= 0 (0 = every seat), got {self.tail_guard_seats}")
        if not 0.0 <= self.gpu_reserve_frac < 1.0:
            raise ConfigError(f"SchedulerConfig.gpu_reserve_frac is a fraction in [0, 1), got {self.gpu_reserve_frac}")

    def quantum_s(self, level: int) -> float:
        """Iteration time a job may use at `level` before demotion; the lowest level never demotes."""
        if level >= self.num_levels - 1:
            return math.inf
        return self.base_quantum_s * self.quantum_ratio ** level

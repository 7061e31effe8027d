"""The three policies and `make_scheduler`.

- `fcfs`: one queue in arrival order, run to completion. Started jobs are never displaced by later ones; a
  later job is only evicted when an earlier one needs its KV blocks to grow.
- `mlfq`: K queues, quantum of level i = base x ratio^i seconds of iteration time; a job that uses up its
  quantum drops a level; every step re-picks the batch from the highest non-empty queues, so an arrival
  (which joins the top queue) preempts lower jobs at the next token boundary.
- `skip-join-mlfq` (FastServe): as `mlfq`, but a new job joins the highest queue whose quantum covers its
  estimated batch-1 prefill time, so long prompts skip the queues where they would be preempted again and
  again; jobs idle past the starvation threshold are promoted to the top; a reserve of free GPU blocks is
  kept for arrivals by swapping out the lowest-priority idle jobs ahead of need, and when nothing had to be
  swapped out the highest-priority swapped jobs are swapped back in ahead of need.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .base import Scheduler, _priority
from .block_manager import BlockManager
from .config import SchedulerConfig
from .cost import IterationTimeFn, LinearCostModel, prefill_time_from
from .output import SchedulerOutput
from .request import Request, SequenceStatus

PrefillTimeFn = Callable[[int], float]


class FCFSScheduler(Scheduler):
    """First come, first served, run to completion (the baseline)."""

    name = "fcfs"

    @property
    def num_levels(self) -> int:
        return 1


class MLFQScheduler(Scheduler):
    """Multi-level feedback queue with geometric quanta and demotion; new jobs enter the top queue."""

    name = "mlfq"

    def _charge(self, req: Request, step_time_s: float) -> None:
        req.quantum_used_s += step_time_s
        req.quantum_iters += 1
        if req.quantum_used_s >= self.config.quantum_s(req.level):
            req.level += 1
            req.quantum_used_s = 0.0
            req.quantum_iters = 0
            req.enqueue_seq = next(self._seq)  # to the back of the lower queue
            self.counters["demotions"] += 1


class SkipJoinMLFQScheduler(MLFQScheduler):
    """FastServe's skip-join MLFQ with starvation promotion and proactive KV swapping."""

    name = "skip-join-mlfq"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, prefill_time_fn: PrefillTimeFn):
        super().__init__(config, block_manager)
        self.prefill_time_fn = prefill_time_fn
        self.reserve_blocks = int(config.gpu_reserve_frac * block_manager.num_gpu_blocks)

    def _initial_level(self, req: Request) -> int:
        estimate = self.prefill_time_fn(req.prompt_len)
        for level in range(self.num_levels):
            if self.config.quantum_s(level) >= estimate:
                return level
        return self.num_levels - 1

    def _on_iteration(self, now: float) -> None:
        if self.counters["iterations"] % self.config.starvation_check_interval == 0:
            self.promote_starved(now)

    def promote_starved(self, now: float) -> int:
        """Move every job idle for at least the threshold to the back of the top queue; returns how many."""
        threshold = self.config.starvation_threshold_s
        starved = sorted((r for r in self._requests.values()
                          if r.level > 0 and r.status is not SequenceStatus.RUNNING
                          and now - r.last_scheduled_time >= threshold), key=_priority)
        for req in starved:
            req.level = 0
            req.quantum_used_s = 0.0
            req.quantum_iters = 0
            req.enqueue_seq = next(self._seq)
        if starved:
            self.counters["promotions"] += len(starved)
            self._rebuild_waiting()
        return len(starved)

    def _rebuild_waiting(self) -> None:
        """Re-file not-started jobs by level after promotions changed their levels."""
        waiting = sorted((r for queue in self._waiting for r in queue), key=_priority)
        self._waiting = [deque() for _ in range(self.num_levels)]
        for req in waiting:
            self._waiting[req.level].append(req)

    def _after_schedule(self, out: SchedulerOutput, scheduled_ids: set[str]) -> None:
        bm = self.block_manager
        # Keep the reserve: swap out the lowest-priority idle jobs (never drop KV just for the reserve).
        for victim in reversed(self._active):
            if bm.num_free_gpu_blocks >= self.reserve_blocks:
                break
            rid = victim.request_id
            if rid in scheduled_ids or not bm.num_gpu_blocks_of(rid) or not bm.can_swap_out(rid):
                continue
            self._evict(victim, out, ahead=True)
        if not self.config.proactive_swap_in or out.swap_out or out.swap_out_ahead or out.recompute:
            return
        # Nothing had to leave the GPU: bring back the jobs most likely to run next, reserve permitting.
        for req in self._active:
            if req.status is not SequenceStatus.SWAPPED:
                continue
            if bm.num_free_gpu_blocks - bm.num_cpu_blocks_of(req.request_id) < self.reserve_blocks:
                break
            pairs = bm.swap_in(req.request_id)
            out.swap_in_ahead.extend(pairs)
            self._count_swap_in(len(pairs))
            req.status = SequenceStatus.PREEMPTED


SCHEDULERS = ("fcfs", "mlfq", "skip-join-mlfq")


def make_scheduler(name: str, config: SchedulerConfig, block_manager: BlockManager,
                   prefill_time_fn: PrefillTimeFn | None = None,
                   iteration_time_fn: IterationTimeFn | None = None) -> Scheduler:
    """Build a policy by name. Skip-join estimates prefill time with `prefill_time_fn`, else derives it from
    `iteration_time_fn` (batch-1 prompt step), else from the default `LinearCostModel`."""
    if name == "fcfs":
        return FCFSScheduler(config, block_manager)
    if name == "mlfq":
        return MLFQScheduler(config, block_manager)
    if name == "skip-join-mlfq":
        if prefill_time_fn is None:
            prefill_time_fn = prefill_time_from(iteration_time_fn or LinearCostModel())
        return SkipJoinMLFQScheduler(config, block_manager, prefill_time_fn)
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")

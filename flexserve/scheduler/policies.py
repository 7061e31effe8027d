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

from .base import Scheduler
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
    """Multi-level feedback queue with geometric quanta and demotion; new jobs enter the top queue.

    MLFQ only decides the order in which the batch is filled. Within a level, jobs that ran last step come
    first (a seat is only taken away by a job of a strictly higher level), then arrival order, which a
    demotion keeps (`demote_to_back` False): jobs past every quantum are served first come, first served.
    """

    name = "mlfq"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        super().__init__(config, block_manager)
        self._last_run_iter: dict[str, int] = {}  # iteration a job last ran in
        self._swapped_in_iter: dict[str, int] = {}  # iteration a job last came back from the host
        self._swapped_out_iter: dict[str, int] = {}  # iteration a job last went to the host
        self._batch_nonempty = 0

    def _key(self, req: Request) -> tuple:
        if req.guarded:  # the tail lane: ahead of every other job, oldest first
            return (-1, 0, 0, req.arrival_time, req.enqueue_seq)
        return (req.level, 1, 0 if req.request_id in self._ran_last_step else 1, req.enqueue_seq)

    def _on_iteration(self, now: float) -> None:
        if self.counters["iterations"] % self.config.tail_guard_check_interval == 0:
            self.guard_tail(now)

    def guard_tail(self, now: float) -> int:
        """Fill the tail lane: the oldest jobs past `tail_guard_s` since arrival, at most `tail_guard_seats`
        at a time, are served ahead of every other job and never demoted, until they finish. It bounds the
        wait of the long jobs MLFQ keeps demoting (its p99) while the other seats stay under MLFQ; measured, it
        trades mean JCT for p99 rather than winning both (bench/RESULTS.md 4b). Returns how many joined."""
        limit = self.config.tail_guard_s
        if limit == float("inf"):
            return 0
        lane = sum(1 for r in self._requests.values() if r.guarded)
        room = (self.config.tail_guard_seats or self.config.max_num_seqs) - lane
        if room <= 0:
            return 0
        old = sorted((r for r in self._requests.values() if not r.guarded and now - r.arrival_time >= limit),
                     key=lambda r: (r.arrival_time, r.enqueue_seq))[:room]
        for req in old:
            req.guarded = True
            req.level = 0  # the queue it waits in, if it never started
            req.quantum_used_s = 0.0
            req.quantum_iters = 0
        if old:
            self.counters["guarded"] += len(old)
            self._rebuild_waiting()
        return len(old)

    def _rebuild_waiting(self) -> None:
        """Re-file not-started jobs by level after promotions changed their levels."""
        waiting = sorted((r for queue in self._waiting for r in queue), key=self._key)
        self._waiting = [deque() for _ in range(self.num_levels)]
        for req in waiting:
            self._waiting[req.level].append(req)

    def _may_start(self, req: Request, need: int) -> bool:
        """Bound the started set by memory: a job without KV starts only if GPU + host keep a margin free
        after it (`start_margin_frac` of both pools) for the growth of the started jobs. Without this, in
        overload every arrival starts, the host fills, and running jobs push others' KV out to recompute."""
        bm = self.block_manager
        margin = int(self.config.start_margin_frac * (bm.num_gpu_blocks + bm.num_cpu_blocks))
        return bm.num_free_gpu_blocks + bm.num_free_cpu_blocks - need >= margin

    def _headroom(self, req: Request, batch_size: int) -> int:
        """A job coming onto the GPU leaves a block free for each job already in the batch, so their
        growth next step does not push it straight back out."""
        return batch_size

    def _may_drop_for(self, req: Request) -> bool:
        """Only a job growing on the GPU may drop others' KV. A swapped job that drops a lower job's KV to
        come back in starts a cascade (the dropped job recomputes, pushing out the next): it waits instead,
        for memory to free up; the jobs ahead of it on the GPU keep running meanwhile."""
        return bool(self.block_manager.num_gpu_blocks_of(req.request_id))

    def _left_recently(self, req: Request) -> bool:
        """Swapped out within the last `min_resident_steps` steps."""
        window = self.config.min_resident_steps
        return self.counters["iterations"] - self._swapped_out_iter.get(req.request_id, -window - 1) <= window

    def _evict(self, victim: Request, out: SchedulerOutput, ahead: bool) -> None:
        super()._evict(victim, out, ahead)
        if victim.status is SequenceStatus.SWAPPED:
            self._swapped_out_iter[victim.request_id] = self.counters["iterations"]

    def _recent(self, req: Request, ran_too: bool = True) -> bool:
        """Came back to the GPU (or, with `ran_too`, ran) within the last `min_resident_steps` steps."""
        now, rid, window = self.counters["iterations"], req.request_id, self.config.min_resident_steps
        return (now - self._swapped_in_iter.get(rid, -window - 1) <= window
                or (ran_too and now - self._last_run_iter.get(rid, -window - 1) <= window))

    def _victims(self, after: Request):
        """Lowest priority first, in three tiers: idle jobs; then jobs that ran within
        `min_resident_steps` steps (their KV is the most likely to be needed again); then, only to a job
        growing on the GPU while the batch is still empty (so some job always progresses), jobs swapped in
        within that window (no ping-pong). A job merely preempted from its seat is fair game: it must not
        block a higher one."""
        ran, came_in = [], []
        for r in super()._victims(after):
            if self._recent(r, ran_too=False):
                came_in.append(r)
            elif self._recent(r):
                ran.append(r)
            else:
                yield r
        yield from ran
        if not self._batch_nonempty and self.block_manager.num_gpu_blocks_of(after.request_id):
            yield from came_in

    def _count_swap_in(self, num_blocks: int) -> None:
        super()._count_swap_in(num_blocks)

    def _try_schedule(self, req, budget, batch_nonempty, out, evicted_ids):
        was_swapped = req.status is SequenceStatus.SWAPPED
        self._batch_nonempty = batch_nonempty
        if was_swapped and batch_nonempty and self._left_recently(req):
            return None  # swapped out a moment ago: let it settle on the host (no ping-pong)
        seq = super()._try_schedule(req, budget, batch_nonempty, out, evicted_ids)
        if seq is not None and was_swapped:
            self._swapped_in_iter[req.request_id] = self.counters["iterations"]
        return seq

    def _retire(self, req, status, finish_time):
        super()._retire(req, status, finish_time)
        self._last_run_iter.pop(req.request_id, None)
        self._swapped_in_iter.pop(req.request_id, None)
        self._swapped_out_iter.pop(req.request_id, None)

    def _charge(self, req: Request, step_time_s: float) -> None:
        self._last_run_iter[req.request_id] = self.counters["iterations"]
        req.quantum_used_s += step_time_s
        req.quantum_iters += 1
        if not req.guarded and req.quantum_used_s >= self.config.quantum_s(req.level):
            req.level += 1
            req.quantum_used_s = 0.0
            req.quantum_iters = 0
            if self.config.demote_to_back:
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
        super()._on_iteration(now)
        if self.counters["iterations"] % self.config.starvation_check_interval == 0:
            self.promote_starved(now)

    def promote_starved(self, now: float) -> int:
        """Move jobs idle for at least the threshold to the top queue, longest idle first, at most
        `max_num_seqs` per check (a mass promotion would only make them take turns); keeps their arrival
        order. Returns how many."""
        threshold = self.config.starvation_threshold_s
        starved = sorted((r for r in self._requests.values()
                          if r.level > 0 and r.status is not SequenceStatus.RUNNING
                          and now - r.last_scheduled_time >= threshold),
                         key=lambda r: (r.last_scheduled_time, r.enqueue_seq))
        limit = self.config.max_promotions_per_check or self.config.max_num_seqs
        starved = starved[:limit]
        for req in starved:
            req.level = 0
            req.quantum_used_s = 0.0
            req.quantum_iters = 0
            if self.config.demote_to_back:
                req.enqueue_seq = next(self._seq)
        if starved:
            self.counters["promotions"] += len(starved)
            self._rebuild_waiting()
        return len(starved)

    def _after_schedule(self, out: SchedulerOutput, scheduled_ids: set[str]) -> None:
        bm = self.block_manager
        # The started jobs that would fill the next batch, in priority order: never swap these out ahead of
        # need, and they are the ones worth prefetching.
        # Demotions during the step reorder them a little, so twice the seats are spared.
        seats = self.config.max_num_seqs
        next_batch = self._active[:seats]  # sorted at the start of this step; good enough one step ahead
        keep = {r.request_id for r in self._active[:2 * seats]}
        # Keep the reserve: swap out the lowest-priority idle jobs (never drop KV just for the reserve),
        # never one that ran or came back within `min_resident_steps` steps (no ping-pong).
        if bm.num_free_gpu_blocks < self.reserve_blocks:
            for victim in reversed(self._active):
                if bm.num_free_gpu_blocks >= self.reserve_blocks:
                    break
                rid = victim.request_id
                if (rid in scheduled_ids or rid in keep or not bm.num_gpu_blocks_of(rid)
                        or not bm.can_swap_out(rid) or self._recent(victim)):
                    continue
                self._evict(victim, out, ahead=True)
        if not self.config.proactive_swap_in or out.swap_out or out.swap_out_ahead or out.recompute:
            return
        # Nothing had to leave the GPU: bring back the swapped jobs of the next batch while the free blocks
        # stay above twice the reserve (hysteresis against swapping them straight out again).
        for req in next_batch:
            if req.status is not SequenceStatus.SWAPPED or self._left_recently(req):
                continue
            if bm.num_free_gpu_blocks - bm.num_cpu_blocks_of(req.request_id) < 2 * self.reserve_blocks:
                break
            pairs = bm.swap_in(req.request_id)
            out.swap_in_ahead.extend(pairs)
            self._count_swap_in(len(pairs))
            self._swapped_in_iter[req.request_id] = self.counters["iterations"]
            req.status = SequenceStatus.PREEMPTED


class ShortestRemainingScheduler(MLFQScheduler):
    """Shortest remaining `max_tokens` first, preemptive at token granularity: the clairvoyant reference.

    Where `max_tokens` is the true output length (the simulator; benchmarks that ignore EOS) this is SRPT, the
    policy of least mean JCT; no size-blind policy such as MLFQ beats it, so it bounds what a scheduler can
    gain on a workload. With real requests `max_tokens` is only a cap and this is shortest-cap-first."""

    name = "srpt"

    def _key(self, req: Request) -> tuple:
        return (0, req.max_tokens - req.num_output_tokens, req.enqueue_seq)

    def add_request(self, req: Request) -> None:
        super().add_request(req)
        queue = self._waiting[req.level]  # not-started jobs in key order (the merge in `_candidates` needs it)
        if len(queue) > 1 and self._key(queue[-1]) < self._key(queue[-2]):
            self._waiting[req.level] = deque(sorted(queue, key=self._key))

    def _on_iteration(self, now: float) -> None:
        pass  # no tail guard: the reference is pure SRPT

    def _charge(self, req: Request, step_time_s: float) -> None:
        pass  # no quanta, no demotion


SCHEDULERS = ("fcfs", "mlfq", "skip-join-mlfq")  # compared by default; "srpt" on request
ALL_SCHEDULERS = (*SCHEDULERS, "srpt")


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
    if name == "srpt":
        return ShortestRemainingScheduler(config, block_manager)
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(ALL_SCHEDULERS)}")

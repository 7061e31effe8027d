"""The scheduling loop every policy shares; policies only order jobs and react to finished steps.

A step is built by walking jobs in priority order (`(level, enqueue_seq)`, smaller first) and giving each a
seat and a share of the token budget while GPU blocks last. A job that needs blocks may evict jobs *after*
it in that order that are not in this step's batch: their KV goes to host blocks (swap-out), or, when the
host is full too, is dropped for recomputation. Jobs that ran last step and were not picked now are
preempted at token granularity; their KV stays where it is.

Jobs not yet started wait in one FIFO per level (already sorted by `enqueue_seq`, so a step never sorts the
whole backlog); started jobs, bounded by KV memory, are re-sorted each step. New jobs are admitted in order
and admission stops at the first one that does not fit, so a stream of small jobs cannot starve a big one
of the same priority and a blocked step does not scan the whole backlog.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence

from .block_manager import BlockManager
from .config import SchedulerConfig
from .errors import QueueFullError, RequestTooLargeError
from .output import ScheduledSeq, SchedulerOutput, SchedulerStats
from .request import Request, SequenceStatus


class Scheduler:
    """Base class: request bookkeeping, the batch walk and the step protocol. Subclasses override the hooks
    `_initial_level`, `_charge` (after each step a job ran in) and `_after_schedule` (memory upkeep)."""

    name = "base"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: list[deque[Request]] = [deque() for _ in range(self.num_levels)]  # never started
        self._active: list[Request] = []  # started, unfinished: bounded by KV memory
        self._last_scheduled: list[ScheduledSeq] = []
        self._ran_last_step: set[str] = set()
        self._stop_admitting = False  # set during a walk once a not-started job failed to fit
        self._gpu_holders: list[Request] = []  # started jobs with GPU blocks at the start of the step
        self._seq = itertools.count()
        self._num_not_started = 0
        self.counters = dict.fromkeys(
            ("swap_outs", "swap_ins", "blocks_swapped_out", "blocks_swapped_in", "recomputes", "preemptions",
             "demotions", "promotions", "guarded", "finished", "aborted", "rejected", "iterations"), 0)

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    # --- policy hooks ----------------------------------------------------------------------------------
    def _initial_level(self, req: Request) -> int:
        return 0

    def _key(self, req: Request) -> tuple:
        """Walk order, smaller first. Must order each waiting FIFO as its deque does (by `enqueue_seq`
        within a level). FCFS and the default: `(level, enqueue_seq)`."""
        return (req.level, req.enqueue_seq)

    def _headroom(self, req: Request, batch_size: int) -> int:
        """Extra GPU blocks a job coming onto the GPU (new, or swapped in) must leave free."""
        return 0

    def _may_start(self, req: Request, need: int) -> bool:
        """Whether a job holding no KV (new, or dropped earlier) may take `need` GPU blocks now."""
        return True

    def _may_drop_for(self, req: Request) -> bool:
        """Whether `req` may drop other jobs' KV (recomputation) to get GPU blocks: only a job that holds
        KV, so arrivals cannot grow the started set past GPU + host memory."""
        bm = self.block_manager
        return bool(bm.num_gpu_blocks_of(req.request_id) or bm.num_cpu_blocks_of(req.request_id))

    def _may_evict(self, victim: Request, ahead: bool) -> bool:
        """Whether `victim` may leave the GPU now (MLFQ: not a job that came back a moment ago)."""
        return True

    def _charge(self, req: Request, step_time_s: float) -> None:
        """Account one step of iteration time to a job that ran in it and did not finish."""

    def _after_schedule(self, out: SchedulerOutput, scheduled_ids: set[str]) -> None:
        """Memory upkeep once the batch is chosen (skip-join: keep a reserve, prefetch swapped jobs)."""

    def _on_iteration(self, now: float) -> None:
        """Called once per finished step (skip-join: periodic starvation promotion)."""

    # --- requests in and out ---------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a new request. Raises `QueueFullError` when `max_queue_len` requests have not started yet,
        and `RequestTooLargeError` when the request could never fit in the GPU pool."""
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already queued")
        bm = self.block_manager
        if bm.max_blocks_held(req.max_total_tokens, self.config.prefill_chunk_size) > bm.num_gpu_blocks:
            raise RequestTooLargeError(
                f"request {req.request_id!r} needs {req.max_total_tokens} KV slots, the GPU pool holds "
                f"{bm.num_gpu_blocks * bm.block_size}")
        if self._num_not_started >= self.config.max_queue_len:
            self.counters["rejected"] += 1
            raise QueueFullError(f"{self._num_not_started} requests are queued (max_queue_len); retry later")
        req.status = SequenceStatus.WAITING
        req.level = min(self._initial_level(req), self.num_levels - 1)
        req.enqueue_seq = next(self._seq)
        self._requests[req.request_id] = req
        self._waiting[req.level].append(req)
        self._num_not_started += 1

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks at once, wherever they are. Call between steps (after
        `on_step_done`, before `schedule`), never while a step that uses its blocks is executing.
        Returns False when the id is unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._retire(req, SequenceStatus.ABORTED, None)
        self.counters["aborted"] += 1
        return True

    def has_work(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def _retire(self, req: Request, status: SequenceStatus, finish_time: float | None) -> None:
        self.block_manager.free(req.request_id)
        del self._requests[req.request_id]
        if req.first_scheduled_time is None:
            self._waiting[req.level].remove(req)
            self._num_not_started -= 1
        else:
            self._active.remove(req)
        req.status = status
        req.finish_time = finish_time

    # --- one step --------------------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        """Choose this step's batch, swaps and preemptions. Must be followed by `on_step_done`."""
        if self._last_scheduled:
            raise RuntimeError("schedule() called twice without on_step_done() in between")
        self.block_manager.begin_step()
        out = SchedulerOutput()
        self._active.sort(key=self._key)
        self._gpu_holders = [r for r in self._active if self.block_manager.num_gpu_blocks_of(r.request_id)]
        scheduled_ids: set[str] = set()
        evicted_ids: set[str] = set()
        admitted: list[Request] = []
        seats, budget = self.config.max_num_seqs, self.config.max_num_batched_tokens
        # Decodes still to be visited keep one token of budget each, so prompt chunks of higher-priority
        # jobs cannot shrink the decode batch (small decode batches waste each step's weight reads).
        decodes_ahead = sum(1 for r in self._active if not r.is_prefill)
        # Bounded lookahead: once the batch has a job, stop after this many jobs that could not get blocks
        # (each failure scans the eviction candidates, and deep in a memory-bound backlog little more fits).
        # An empty batch keeps looking, so the highest-priority job on the GPU always makes progress.
        failures_left = self.config.max_num_seqs
        for req in self._candidates():
            if seats == 0 or budget == 0 or (failures_left <= 0 and scheduled_ids):
                break
            is_new = req.first_scheduled_time is None
            if not req.is_prefill:
                decodes_ahead -= 1
            if req.request_id in evicted_ids:
                continue
            tokens = budget if not req.is_prefill else budget - min(decodes_ahead, seats - 1)
            seq = self._try_schedule(req, tokens, len(scheduled_ids), out, evicted_ids) if tokens > 0 else None
            if seq is None:
                failures_left -= 1
                if is_new:
                    self._stop_admitting = True
                continue
            if is_new:
                req.first_scheduled_time = now
                admitted.append(req)
            req.status = SequenceStatus.RUNNING
            out.scheduled.append(seq)
            scheduled_ids.add(req.request_id)
            seats -= 1
            budget -= seq.num_tokens
        self._move_admitted(admitted)
        for req in self._active:
            rid = req.request_id
            if rid not in self._ran_last_step or rid in scheduled_ids:
                continue
            if req.status is SequenceStatus.RUNNING:  # not evicted: its KV stays on the GPU
                req.status = SequenceStatus.PREEMPTED
            req.num_preemptions += 1
            self.counters["preemptions"] += 1
            out.preempted.append(rid)
        self._after_schedule(out, scheduled_ids)
        self._last_scheduled = out.scheduled
        self._ran_last_step = set()  # on_step_done sets it from the batch it confirms
        return out

    def _candidates(self) -> Iterator[Request]:
        """Started jobs and not-started jobs merged in priority order; not-started ones stop being offered
        once one of them failed to fit (`_stop_admitting`)."""
        self._stop_admitting = False
        key = self._key
        waiting = heapq.merge(*self._waiting, key=key)
        next_new = next(waiting, None)
        for req in self._active:
            while next_new is not None and not self._stop_admitting and key(next_new) < key(req):
                yield next_new
                next_new = next(waiting, None)
            yield req
        while next_new is not None and not self._stop_admitting:
            yield next_new
            next_new = next(waiting, None)

    def _try_schedule(self, req: Request, budget: int, batch_nonempty: int, out: SchedulerOutput,
                      evicted_ids: set[str]) -> ScheduledSeq | None:
        """Fit `req` into this step (evicting lower-priority jobs if needed); None if it cannot run now.
        `batch_nonempty`: how many jobs the batch already holds (truthy when non-empty)."""
        bm = self.block_manager
        rid = req.request_id
        num_new = min(req.num_uncomputed_tokens, self.config.prefill_chunk_size, budget)
        if num_new <= 0:
            return None
        target = req.num_computed_tokens + num_new
        is_swapped = req.status is SequenceStatus.SWAPPED
        need = bm.num_new_blocks_needed(rid, target) + (bm.num_cpu_blocks_of(rid) if is_swapped else 0)
        # Keep the watermark when admitting a job that holds nothing yet, unless the batch would be empty.
        if req.first_scheduled_time is None and batch_nonempty:
            need += bm.watermark_blocks
        if not bm.num_gpu_blocks_of(rid):
            if not is_swapped and not self._may_start(req, need):
                return None
            need += self._headroom(req, batch_nonempty)
        if need > bm.num_free_gpu_blocks and not self._make_room(req, need, out, evicted_ids):
            return None
        if is_swapped:
            pairs = bm.swap_in(rid)
            out.swap_in.extend(pairs)
            self._count_swap_in(len(pairs))
        bm.allocate(rid, target)
        start = req.num_computed_tokens
        return ScheduledSeq(request=req, num_tokens=num_new, start_pos=start, is_prefill=req.is_prefill,
                            samples=target == req.num_tokens, block_table=bm.block_table(rid))

    def _victims(self, after: Request) -> Iterator[Request]:
        """Started jobs holding GPU blocks, lower in priority than `after`, lowest first. Drawn from the
        holders listed at the start of the step: jobs that gain blocks later in the step are in its batch,
        and the batch is never evicted."""
        key = self._key(after)
        bm = self.block_manager
        for r in reversed(self._gpu_holders):
            if self._key(r) <= key:
                return
            if bm.num_gpu_blocks_of(r.request_id) and self._may_evict(r, ahead=False):
                yield r

    def _make_room(self, req: Request, need: int, out: SchedulerOutput, evicted_ids: set[str]) -> bool:
        """Evict lower-priority jobs, lowest first, until `need` GPU blocks are free; evict nothing if that
        cannot work. Only a job that already holds KV may push others' KV out for recomputation: letting
        jobs without KV do so would let arrivals grow the started set past GPU + host memory and thrash."""
        bm = self.block_manager
        may_drop = self._may_drop_for(req)
        free_gpu, free_cpu = bm.num_free_gpu_blocks, bm.num_free_cpu_blocks
        plan: list[Request] = []
        for victim in self._victims(req):
            if free_gpu >= need:
                break
            num_blocks = bm.num_gpu_blocks_of(victim.request_id)
            if num_blocks <= free_cpu:
                free_cpu -= num_blocks
            elif not may_drop:
                continue
            free_gpu += num_blocks
            plan.append(victim)
        if free_gpu < need:
            return False
        for victim in plan:
            self._evict(victim, out, ahead=False)
            evicted_ids.add(victim.request_id)
        return True

    def _evict(self, victim: Request, out: SchedulerOutput, ahead: bool) -> None:
        """Move a job's KV to the host, or drop it for recomputation when the host is full too."""
        bm = self.block_manager
        rid = victim.request_id
        if bm.can_swap_out(rid):
            pairs = bm.swap_out(rid)
            (out.swap_out_ahead if ahead else out.swap_out).extend(pairs)
            victim.status = SequenceStatus.SWAPPED
            victim.num_swaps += 1
            self.counters["swap_outs"] += 1
            self.counters["blocks_swapped_out"] += len(pairs)
        else:
            bm.free(rid)
            victim.num_computed_tokens = 0
            victim.status = SequenceStatus.WAITING
            victim.num_recomputes += 1
            self.counters["recomputes"] += 1
            out.recompute.append(rid)

    def _count_swap_in(self, num_blocks: int) -> None:
        self.counters["swap_ins"] += 1
        self.counters["blocks_swapped_in"] += num_blocks

    def _move_admitted(self, admitted: Sequence[Request]) -> None:
        """Jobs started this step leave their waiting FIFO for the started list."""
        if not admitted:
            return
        gone = {r.request_id for r in admitted}
        for level in {r.level for r in admitted}:
            queue = self._waiting[level]
            while queue and queue[0].request_id in gone:
                queue.popleft()
            if any(r.request_id in gone for r in queue):
                self._waiting[level] = deque(r for r in queue if r.request_id not in gone)
        self._active.extend(admitted)
        self._num_not_started -= len(admitted)

    def on_step_done(self, now: float, step_time_s: float,
                     new_tokens: Mapping[str, Sequence[int] | int], finished_ids: Iterable[str] = ()
                     ) -> list[Request]:
        """Record a finished step: tokens computed, tokens sampled (ids, or a count from the simulator),
        finishes (max_tokens reached, or `finished_ids` for EOS/stop strings), quanta. Returns the requests
        that finished; their blocks are already free."""
        stop = set(finished_ids)
        finished: list[Request] = []
        self.counters["iterations"] += 1
        for seq in self._last_scheduled:
            req = seq.request
            rid = req.request_id
            if rid not in self._requests:  # aborted during the step
                continue
            req.num_computed_tokens += seq.num_tokens
            self.block_manager.release_outside_window(rid, req.num_computed_tokens)
            req.num_steps += 1
            req.time_scheduled_s += step_time_s
            req.last_scheduled_time = now
            if seq.samples:
                if rid not in new_tokens:
                    raise ValueError(f"step sampled for request {rid!r} but new_tokens has no entry for it")
                toks = new_tokens[rid]
                if isinstance(toks, int):
                    req.num_output_tokens += toks
                else:
                    req.output_token_ids.extend(toks)
                    req.num_output_tokens += len(toks)
                if req.first_token_time is None and req.num_output_tokens:
                    req.first_token_time = now
            if req.num_output_tokens >= req.max_tokens or rid in stop:
                finished.append(req)
            else:
                self._charge(req, step_time_s)
        for rid in stop:  # stopped by the engine outside a sampling step
            req = self._requests.get(rid)
            if req is not None and req not in finished:
                finished.append(req)
        for req in finished:
            self._retire(req, SequenceStatus.FINISHED, now)
            self.counters["finished"] += 1
        self._ran_last_step = {seq.request_id for seq in self._last_scheduled} - {r.request_id for r in finished}
        self._last_scheduled = []
        self._on_iteration(now)
        return finished

    # --- metrics ---------------------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        per_level = [0] * self.num_levels
        by_status = dict.fromkeys(SequenceStatus, 0)
        for req in list(self._requests.values()):  # a snapshot: the engine thread may change the table
            per_level[req.level] += 1
            by_status[req.status] += 1
        usage = self.block_manager.usage()
        c = self.counters
        return SchedulerStats(
            queue_len_per_level=per_level, num_waiting=by_status[SequenceStatus.WAITING],
            num_running=by_status[SequenceStatus.RUNNING], num_preempted=by_status[SequenceStatus.PREEMPTED],
            num_swapped=by_status[SequenceStatus.SWAPPED], num_gpu_blocks_used=usage.num_used_gpu_blocks,
            num_cpu_blocks_used=usage.num_used_cpu_blocks, num_gpu_blocks=usage.num_gpu_blocks,
            num_cpu_blocks=usage.num_cpu_blocks, num_swap_outs=c["swap_outs"], num_swap_ins=c["swap_ins"],
            num_blocks_swapped_out=c["blocks_swapped_out"], num_blocks_swapped_in=c["blocks_swapped_in"],
            num_recomputes=c["recomputes"], num_preemptions=c["preemptions"], num_demotions=c["demotions"],
            num_promotions=c["promotions"], num_finished=c["finished"], num_aborted=c["aborted"],
            num_rejected=c["rejected"], num_iterations=c["iterations"])

"""The online engine: continuous batching over a paged KV cache, driven by a `flexserve.scheduler` policy.

One background thread owns the model, the KV pools and the scheduler. Every iteration it takes new requests
and cancellations from its inbox, asks the scheduler who runs (prefill chunks and decodes together,
preemptions, swaps), hands the step's `StepPlan` to the model runner (`runner.py`: block copies, one forward
over the flattened tokens of every scheduled sequence, sampling), tells the scheduler what came out, and
passes the tokens to the output processor (`output_processor.py`: text, stop strings, delivery to each
request's sink). Under torchrun (`tensor_parallel`, `pipeline_parallel`) this object exists on every rank:
rank 0 schedules and broadcasts each step's plan, the others `run_worker()`.

This module is the engine's public face: `AsyncEngine`, `EngineConfig` and `StepOutput` are imported from
here; the streams clients read are `streaming.py`'s.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from ..errors import RequestError
from ..scheduler import PENDING_TOKEN, BlockManager, Request, SchedulerConfig, make_scheduler
from ..tokenizer import Tokenizer
from ..weights import is_hub_id
from .config import EngineConfig
from .front import EngineFront
from .job_cost import job_cost_model
from .output_processor import LiveRequest, OutputProcessor
from .outputs import StepOutput
from .paged_batch import SeqChunk
from .rank_group import RankGroup
from .runner import ModelRunner, SampledStep, StepPlan, join_rank_group
from .sampling import SamplingParams, make_generator, stop_token_ids
from .streaming import LoopSink, stream_outputs

__all__ = ["AsyncEngine", "EngineConfig", "StepOutput"]


class AsyncEngine(EngineFront):
    """Continuous-batching engine behind the HTTP server (see module docstring)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.tp: RankGroup | None = join_rank_group(config)  # the torchrun group when tensor or pipeline parallel
        self.runner = ModelRunner(config, self.tp)
        self.model_path, self.device, self.dtype = self.runner.model_path, self.runner.device, self.runner.dtype
        self.model_config = self.runner.model_config  # this rank's shard under tensor/pipeline parallelism
        self.tokenizer = Tokenizer(self.model_path, self.model_config.vocab_size)
        # what clients send as `model`: a Hugging Face id as given (its local folder is a snapshot hash)
        self.model_name = config.model if config.model and is_hub_id(config.model) else \
            self.model_path.rstrip("/").split("/")[-1]
        self.outputs = OutputProcessor(self.tokenizer, self._lost)
        self.settings = settings = self.runner.settings
        self.rates = self.runner.rates  # the device's measured matmul and memory rates (None on a CPU)
        self.blocks = BlockManager(self.runner.num_gpu_blocks, self.runner.num_cpu_blocks, config.block_size,
                                   sinks=config.attention_sinks, window=config.sliding_window)
        sched_cfg = SchedulerConfig(max_num_seqs=settings.max_num_seqs,
                                    max_num_batched_tokens=settings.max_num_batched_tokens,
                                    prefill_chunk_size=settings.prefill_chunk_size, max_queue_len=config.max_queue_len,
                                    **config.scheduler_options)
        # skip-join places jobs by this model's prefill time on this device, not by fixed constants
        self.job_cost = job_cost_model(self.model_config, self.dtype, self.device, self.runner.rates) \
            if config.scheduler == "skip-join-mlfq" else None
        self.scheduler = make_scheduler(config.scheduler, sched_cfg, self.blocks, iteration_time_fn=self.job_cost)
        self._live: dict[str, LiveRequest] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self._workers_released = False
        self._fallback = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self._async = config.async_scheduling and self.tp is None  # see `step`
        self._pending: _Pending | None = None  # the launched step whose tokens are not read yet
        self.counters = {"generated_tokens": 0, "finished_requests": 0, "aborted_requests": 0, "steps": 0}
        self.error: BaseException | None = None

    @property
    def executor(self):
        """The model's offloading executor (its placed weights), None once the memory was released."""
        return self.runner.executor

    @property
    def kv(self):
        return self.runner.kv

    @property
    def graphs(self):
        """The decode graphs, or None where decode runs eagerly."""
        return self.runner.graphs

    # --- public API ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flexserve-engine", daemon=True)
            self._thread.start()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream a request's output. Errors (bad request, queue full) raise before the first output; closing
        the iterator early aborts the request and frees its KV blocks."""
        params, rid = self._prepare(prompt_token_ids, params, request_id)
        live_queue: asyncio.Queue = asyncio.Queue()
        accepted = self.submit(prompt_token_ids, params, rid, LoopSink(asyncio.get_running_loop()), live_queue)
        async for out in stream_outputs(asyncio.wrap_future(accepted), live_queue, lambda: self.abort(rid)):
            yield out

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, sink,
               queue: asyncio.Queue | None = None) -> concurrent.futures.Future:
        """Hand a validated request to the engine thread; its outputs go to `sink` (see `LoopSink`). The future
        resolves once the scheduler took it, or holds the reason it did not (queue full, too large)."""
        live = LiveRequest(Request(request_id, prompt_token_ids=list(prompt_token_ids), max_tokens=params.max_tokens,
                                   arrival_time=time.monotonic()), params,
                           make_generator(params.seed, self._fallback), stop_token_ids(self.model_config, params),
                           sink, queue)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", live, accepted))
        self._wake.set()
        if self._thread is not None and not self._thread.is_alive():  # it died after the caller's check
            self._fail_pending(RuntimeError(f"the engine stopped: {self.error}"))
        return accepted

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def call_in_engine(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps, for what must happen there (a profiler records
        the thread it is started on); the future holds its result or its error."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, done))
        self._wake.set()
        return done

    def stats(self) -> dict:
        s = self.scheduler.stats()  # reads snapshots (list(...)) of the tables the engine thread changes
        return {
            "kv_blocks_total": s.num_gpu_blocks, "kv_blocks_used": s.num_gpu_blocks_used,
            "cpu_blocks_total": s.num_cpu_blocks, "cpu_blocks_used": s.num_cpu_blocks_used,
            "num_running": s.num_running, "num_waiting": s.num_waiting, "num_swapped": s.num_swapped,
            "queue_len_per_level": list(s.queue_len_per_level), "num_preemptions": s.num_preemptions,
            "num_swaps": s.num_swap_outs, "num_recomputes": s.num_recomputes, **self.counters,
        }

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; with `drain`, let running ones finish (up to `timeout` seconds)."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while drain and self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            if self._thread.is_alive():  # a step is still running: leave the model to it
                return
        self.runner.close()
        if self.tp is not None and self.error is None:
            self._release_workers()  # also when the engine thread never started
            self.tp.leave()

    def release_memory(self) -> None:
        """Drop the weights and KV pools of a shut-down engine now, whoever still holds the engine object
        (a benchmark that starts several engines in one process needs the memory back at once)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("release_memory() needs a shut-down engine")
        self.runner.release()

    def run_worker(self) -> None:
        """A parallel rank other than 0: execute rank 0's plans until it sends None."""
        if self.tp is None or self.tp.is_driver:
            raise RuntimeError("run_worker() is for parallel ranks other than 0")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while (plan := self.tp.broadcast_plan(None)) is not None:
            self.runner.execute(plan, sample=False)
        self.runner.close()
        self.tp.leave()

    # --- the engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.device.type == "cuda":  # a new thread starts on GPU 0: Triton and graphs use the current one
                torch.cuda.set_device(self.device)
            self.runner.capture_graphs()
            while not self._stop:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._settle_pending()
                    self.outputs.flush()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as e:  # surface to every waiting client rather than hanging them
            self.error = e
            raise
        finally:
            with contextlib.suppress(Exception):  # tokens already computed still reach their clients
                self._settle_pending()
                self.outputs.flush()
            self._fail_pending(RuntimeError(f"engine failed: {self.error}") if self.error else
                               RequestError("the engine was shut down before this request finished"))
            if self.error is not None and self.tp is not None:
                self.tp.abort()  # workers may be inside this step's collectives: break them, do not wait
            else:
                self._release_workers()

    def _release_workers(self) -> None:
        """Send the tensor-parallel workers the end-of-plans marker, once."""
        if self.tp is not None and not self._workers_released:
            self._workers_released = True
            self.tp.broadcast_plan(None)

    def _fail_pending(self, error: BaseException) -> None:
        """Nobody may wait forever: refuse requests not yet admitted, end the ones still running."""
        while True:
            try:
                kind, _, fut = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind in ("add", "call") and not fut.done():
                fut.set_exception(error)
        self.outputs.deliver([(live, error) for live in self._live.values()])
        self._live.clear()

    def _lost(self, live: LiveRequest) -> None:
        """Its client is gone: stop serving the request."""
        if self._live.pop(live.request_id, None) is not None:
            self.scheduler.abort(live.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if not fut.set_running_or_notify_cancel():
                    continue  # its client left before the engine took it: never schedule it
                try:
                    self.scheduler.add_request(item.request)
                except Exception as e:
                    fut.set_exception(e)
                    continue
                self._live[item.request_id] = item
                fut.set_result(None)
            elif kind == "call":
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(item())
                    except Exception as e:
                        fut.set_exception(e)
            elif kind == "abort" and item in self._live:
                self.scheduler.abort(item)
                live = self._live.pop(item)
                self.counters["aborted_requests"] += 1
                self.outputs.deliver([(live, self.outputs.output(live, [], None, True, "abort"))])

    def step(self) -> None:
        """One iteration: the scheduler's plan, its device work, sampling, bookkeeping.

        Asynchronous scheduling (the default on one rank): the host does not wait for a step's tokens before
        planning the next. Step N's tokens stay on the device; the scheduler records a `PENDING_TOKEN` for each,
        step N+1 is planned and launched with those tokens fed in on the device (`StepPlan.feed`), and only
        then does the host read step N's tokens, check stop tokens and strings, and deliver them, while step
        N+1 computes. So scheduling, batch building, detokenizing and delivery overlap the GPU instead of
        adding to every step. A request that stops on a token (EOS, a stop string) is seen one step late: it
        ran one more step whose token is dropped. Finishing at `max_tokens` is known without the token, so it
        costs nothing. Synchronous mode (`async_scheduling=False`, and every tensor/pipeline parallel engine,
        whose other ranks need the ids) reads each step's tokens before planning the next."""
        t0 = time.monotonic()
        out = self.scheduler.schedule(t0)
        prev = self._pending
        plan = self._plan(out, prev)
        if self.tp is not None:
            self.tp.broadcast_plan(plan)
        executed = self.runner.execute(plan, sample=True, fed=prev.sampled.chosen if plan.feed else None)
        current = self.runner.sample(executed, [self._live.get(rid) or _Gone(rid) for rid in
                                                (out.scheduled[i].request.request_id for i in executed.sampled)])
        self.counters["steps"] += 1
        if self._async:
            stopped = self._settle(prev) if prev is not None else {}
            self.outputs.flush()  # host work that overlaps this step's GPU work
            t1 = time.monotonic()
            pending = {rid: [PENDING_TOKEN] for rid in current.request_ids}
            finished = self.scheduler.on_step_done(t1, t1 - t0, pending, stopped)
            self._pending = _Pending(current, {r.request_id for r in finished} - set(stopped))
            return
        self.outputs.flush()  # the previous step's text, while this step computes
        result = current.output()
        stopped = self._stops(result)
        t1 = time.monotonic()
        finished = self.scheduler.on_step_done(t1, t1 - t0, {rid: [tok] for rid, tok, _ in result}, stopped)
        self._deliver(result, {r.request_id for r in finished}, stopped)

    def _plan(self, out, prev: "_Pending | None") -> StepPlan:
        """The runner's plan of a scheduled step. Inputs the previous step sampled but the host has not read
        yet are fed from the device; if one cannot be (it is not a lone decode token), the previous step is
        settled first and the plan reads real ids."""
        seqs, feed = [], []
        rows = prev.rows if prev is not None and not prev.settled else {}
        for i, s in enumerate(out.scheduled):
            tokens = s.request.token_ids(s.start_pos, s.start_pos + s.num_tokens)
            if rows and tokens[-1] == PENDING_TOKEN:
                j = rows.get(s.request.request_id)
                if j is None or len(tokens) != 1:
                    self._settle(prev)
                    return self._plan(out, prev)
                feed.append((i, j))
            seqs.append(SeqChunk(tokens, s.start_pos, s.block_table, s.samples))
        return StepPlan(seqs, out.swap_out, out.swap_in, out.swap_out_ahead, out.swap_in_ahead, feed)

    def _settle(self, pending: "_Pending") -> dict[str, str]:
        """Read a pending step's tokens (waiting for the device if it has not finished), write them over the
        requests' `PENDING_TOKEN`s, check stops and queue the outputs. Returns the requests that stopped on
        their token and are still scheduled (the caller tells the scheduler, which retires them)."""
        if pending.settled:
            return pending.stopped
        result = pending.sampled.output()
        for rid, tok, _ in result:
            live = self._live.get(rid)
            if live is not None and live.request.output_token_ids[-1] == PENDING_TOKEN:
                live.request.output_token_ids[-1] = tok
        stopped = self._stops(result)
        self._deliver(result, pending.done | set(stopped), stopped)
        pending.settled, pending.stopped = True, {r: why for r, why in stopped.items() if r not in pending.done}
        return pending.stopped

    def _settle_pending(self) -> None:
        """Settle the step still pending (when the loop idles or ends): its tokens reach their clients."""
        if self._pending is not None:
            stopped = self._settle(self._pending)
            self._pending = None
            for rid in stopped:  # no step left to retire them in
                self.scheduler.abort(rid)

    def _stops(self, result) -> dict[str, str]:
        """Requests whose sampled token ends them (a stop token, or the end of a stop string) -> "stop"."""
        stopped: dict[str, str] = {}
        for rid, tok, _ in result:
            live = self._live.get(rid)
            reason = self.outputs.stop_reason(live, tok) if live is not None else None
            if reason is not None:
                stopped[rid] = reason
        return stopped

    def _deliver(self, result, done: set[str], stopped: dict[str, str]) -> None:
        """Queue each token for its client (the next `flush` sends them); `done` requests end with it."""
        for rid, tok, lp in result:
            live = self._live.get(rid)
            if live is None:  # aborted, or it stopped a step earlier (this token is one too many)
                continue
            self.counters["generated_tokens"] += 1
            finished = rid in done
            if finished:
                self._live.pop(rid)
                self.counters["finished_requests"] += 1
            self.outputs.add(live, tok, lp, finished, stopped.get(rid, "length") if finished else None)


@dataclass
class _Pending:
    """A launched step whose tokens the host has not read yet (asynchronous scheduling)."""

    sampled: SampledStep
    done: set[str]  # requests the scheduler already finished with this step (max_tokens)
    settled: bool = False
    stopped: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> dict[str, int]:
        """Request id -> its row in `sampled.chosen`."""
        return {rid: j for j, rid in enumerate(self.sampled.request_ids)}


@dataclass
class _Gone:
    """Sampling state for a row whose request ended while its step was planned (its token is dropped)."""

    request_id: str
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    generator: torch.Generator | None = None

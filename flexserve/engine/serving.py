"""The online engine: continuous batching over a paged KV cache, driven by a `flexserve.scheduler` policy.

One background thread owns the model, the KV pools and the scheduler. Every iteration it takes new requests
and cancellations, asks the scheduler who runs (prefill chunks and decodes together, preemptions, swaps),
executes the block copies, runs one forward pass over the flattened tokens of every scheduled sequence and
samples. Results go to each request's sink, one hand-over per sink per step: the asyncio event loop that
asked (`LoopSink`), or a pipe to the server process (`remote.PipeSink`). The model runs through the
offloading executor's layer stream, so a serving model can itself be offloaded (weights on the CPU or disk
tier under a `Policy`). On a GPU, attention reads the paged pools with a Triton kernel and decode-only steps
replay CUDA graphs (`decode_graphs.py`). Under torchrun (`tensor_parallel`, `pipeline_parallel`) this object
exists on every rank: rank 0 schedules and broadcasts each step's plan, the others `run_worker()`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import torch

from ..errors import FlexServeError, RequestError
from ..kernels.paged_attention import kernel_supports
from ..models.layers import decoder_layer, lm_head, rope_cos_sin
from ..offload.budget import check_fits
from ..offload.executor import OffloadExecutor
from ..offload.policy import Policy
from ..scheduler import BlockManager, QueueFullError, Request, SchedulerConfig, make_scheduler
from ..tokenizer import Tokenizer
from ..weights import DummySource
from .decode_graphs import DecodeGraphs
from .detokenize import IncrementalText, find_stop
from .llm import open_model
from .paged import PagedKV
from .paged_batch import PagedBatch, SeqChunk, paged_attend
from .sampling import SamplingParams, fit_prompt, logprob_entry, make_generator, sample, stop_token_ids

if TYPE_CHECKING:
    from ..parallel.serving import ServingGroup

GiB = 1 << 30


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


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class _Live:
    """Engine-side state of one request."""

    request: Request
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    sink: "LoopSink | object"  # where its outputs go: an event loop here, or a pipe to another process
    queue: asyncio.Queue | None  # the request's queue on that loop (None for a pipe sink)
    detok: IncrementalText | None = None  # the output's text so far
    sent: str = ""  # text already delivered
    stop_text: str | None = None  # the final text when a stop string ended the request


class EngineFront:
    """The request checks every engine front end makes before a request reaches an engine loop (this
    process's `AsyncEngine`, or `remote.EngineProcess`). Needs `model_config`, `error`, `_accepting`, `_ids`."""

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Reject what cannot run; clip max_tokens to the context window. Returns the params to use."""
        return fit_prompt(self.model_config, prompt_token_ids, params)

    def _prepare(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str | None) -> tuple[SamplingParams, str]:
        if not self._accepting:
            raise RequestError("the server is shutting down")
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        params = self.validate(list(prompt_token_ids), params)
        return params, request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    async def warm_up(self) -> None:
        """Serve a few throw-away requests before the first real one: prompts of several lengths at once, so
        that prefill, chunked and mixed steps compile their kernels (Triton specialises on sizes) and the
        decode graphs are captured (the engine thread captures all buckets as it starts). Without it the
        first clients of a GPU server pay seconds of compilation. Their tokens count in the engine's stats."""
        vocab, limit = self.model_config.vocab_size, self.model_config.max_position
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

        async def one(n: int) -> None:
            try:
                async for _ in self.generate([(7 * i + 3) % vocab for i in range(n)], params):
                    pass
            except FlexServeError:  # a length the KV pool or the queue cannot take now: skip it, serve anyway
                pass
        await asyncio.gather(*(one(n) for n in (1, 7, 16, 33, 130, 515, 1100) if n + 4 <= limit))


class AsyncEngine(EngineFront):
    """Continuous-batching engine behind the HTTP server (see module docstring)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path, source, self.device, self.dtype = open_model(config.model, config.dtype, config.device)
        self.tp: ServingGroup | None = None  # the torchrun group when tensor or pipeline parallel
        self._reduce = None
        self._workers_released = False
        self._unsent: list[tuple] = []  # (live, token, logprobs, finished, reason) of the last step
        if config.tensor_parallel > 1 or config.pipeline_parallel > 1:
            from ..parallel.serving import ServingGroup

            self.tp = ServingGroup.join(config.tensor_parallel, config.pipeline_parallel, source.config,
                                        self.device)
            self.device = self.tp.device(self.device)
            if isinstance(source, DummySource) and self.device.type == "cuda":
                source.device = self.device
            source = self.tp.shard(source)  # this rank's stage of layers, its heads and MLP columns of each
            self._reduce = self.tp.reduce()
        self.model_config = cfg = source.config
        policy = config.policy or Policy()
        policy.require_weights_only("serving keeps the KV cache in its own paged pools (moved to host memory by "
                                    "the scheduler) and activations on the GPU", config.offload_dir)
        check_fits(cfg, policy, torch.empty((), dtype=self.dtype).element_size(), 1, self.device)
        self.executor = OffloadExecutor(source, policy, self.device, self.dtype, config.offload_dir)
        self.tokenizer = Tokenizer(self.model_path, cfg.vocab_size)
        self.model_name = self.model_path.rstrip("/").split("/")[-1]
        per_block = PagedKV.bytes_per_block(cfg, config.block_size, self.dtype)
        num_gpu = config.num_gpu_blocks or self._default_gpu_blocks(per_block)
        num_cpu = config.num_cpu_blocks if config.num_cpu_blocks is not None else max(
            1, (4 * GiB if self.device.type == "cuda" else GiB) // per_block)
        if self.tp is not None:  # block ids must mean the same on every rank
            num_gpu, num_cpu = self.tp.agree_min(num_gpu, self.device), self.tp.agree_min(num_cpu, self.device)
        self.kv = PagedKV(cfg, self.device, self.dtype, num_gpu, num_cpu, config.block_size)
        # Graph capture of the collectives is not wired up: parallel ranks run decode eagerly.
        self.graphs = self._decode_graphs(policy) if config.cuda_graphs and self.tp is None else None
        self.blocks = BlockManager(num_gpu, num_cpu, config.block_size)
        sched_cfg = SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                    max_num_batched_tokens=config.max_num_batched_tokens,
                                    prefill_chunk_size=config.prefill_chunk_size, max_queue_len=config.max_queue_len,
                                    **config.scheduler_options)
        self.scheduler = make_scheduler(config.scheduler, sched_cfg, self.blocks)
        self._live: dict[str, _Live] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self._fallback = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self.counters = {"generated_tokens": 0, "finished_requests": 0, "aborted_requests": 0, "steps": 0}
        self.error: BaseException | None = None

    def _decode_graphs(self, policy: Policy) -> DecodeGraphs | None:
        """Graphs need a GPU, resident uncompressed weights and the paged-attention kernel (no host syncs)."""
        if not (self.device.type == "cuda" and policy.w_gpu_percent == 100 and not policy.compress_weight
                and kernel_supports(self.device, self.model_config.head_dim)):
            return None
        cfg = self.model_config
        max_blocks = -(-cfg.max_position // self.config.block_size)
        return DecodeGraphs(self._model_forward, self.config.max_num_seqs, max_blocks, self.config.block_size,
                            self.kv.scratch_block, self.device)

    def _default_gpu_blocks(self, per_block: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(16, int(free * 0.85) // per_block)
        return max(16, GiB // per_block)

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
        live = _Live(Request(request_id, prompt_token_ids=list(prompt_token_ids), max_tokens=params.max_tokens,
                             arrival_time=time.monotonic()), params,
                     make_generator(params.seed, self._fallback), stop_token_ids(self.model_config, params), sink,
                     queue)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", live, accepted))
        self._wake.set()
        if self._thread is not None and not self._thread.is_alive():  # it died after the caller's check
            self._fail_pending(RuntimeError(f"the engine stopped: {self.error}"))
        return accepted

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

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
        self.executor.close()
        if self.tp is not None and self.error is None:
            self._release_workers()  # also when the engine thread never started
            self.tp.leave()

    def release_memory(self) -> None:
        """Drop the weights and KV pools of a shut-down engine now, whoever still holds the engine object
        (a benchmark that starts several engines in one process needs the memory back at once)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("release_memory() needs a shut-down engine")
        if self.kv is not None:
            self.kv.finish_pending(sync=True)  # DMA into the pinned pool must land before it is unmapped
        self.executor = self.kv = self.graphs = None

    # --- the engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.device.type == "cuda":  # a new thread starts on GPU 0: Triton and graphs use the current one
                torch.cuda.set_device(self.device)
            if self.graphs is not None:
                self.graphs.capture_all()
            while not self._stop:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._flush_outputs()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as e:  # surface to every waiting client rather than hanging them
            self.error = e
            raise
        finally:
            with contextlib.suppress(Exception):  # tokens already computed still reach their clients
                self._flush_outputs()
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
            if kind == "add" and not fut.done():
                fut.set_exception(error)
        for live in list(self._live.values()):
            self._deliver(live, error)
        self._live.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.scheduler.add_request(item.request)
                except Exception as e:
                    fut.set_exception(e)
                    continue
                self._live[item.request.request_id] = item
                fut.set_result(None)
            elif kind == "abort" and item in self._live:
                self.scheduler.abort(item)
                live = self._live.pop(item)
                self.counters["aborted_requests"] += 1
                self._deliver(live, self._output(live, [], None, True, "abort"))

    def step(self) -> None:
        """One iteration: swaps, one forward pass over every scheduled sequence, sampling, bookkeeping.

        The previous step's outputs are detokenized and delivered while this step's forward runs on the GPU
        (`_flush_outputs` between launching the forward and waiting for its tokens). Requests with stop
        strings are detokenized at once, since the text decides whether they end."""
        t0 = time.monotonic()
        out = self.scheduler.schedule(t0)
        seqs = [SeqChunk(s.request.all_token_ids[s.start_pos:s.start_pos + s.num_tokens], s.start_pos,
                         s.block_table, s.samples) for s in out.scheduled]
        plan = (seqs, out.swap_out, out.swap_in, out.swap_out_ahead, out.swap_in_ahead)
        if self.tp is not None:
            self.tp.broadcast_plan(plan)
        batch, logits = self._execute(*plan, sample=True)
        self._flush_outputs()  # host work that overlaps the GPU's
        sampled = self._sample(out.scheduled, batch, logits) if batch is not None else {}
        stopped: dict[str, str] = {}
        new_tokens = {rid: [tok] for rid, (tok, _) in sampled.items()}
        for rid, (tok, _) in sampled.items():
            live = self._live[rid]
            if tok in live.stop_ids or (live.params.stop and self._hit_stop_string(live, tok)):
                stopped[rid] = "stop"
        t1 = time.monotonic()
        finished = {r.request_id for r in self.scheduler.on_step_done(t1, t1 - t0, new_tokens, stopped)}
        self.counters["steps"] += 1
        self.counters["generated_tokens"] += len(sampled)
        for rid, (tok, lp) in sampled.items():
            live = self._live[rid]
            done = rid in finished
            if done:
                self._live.pop(rid)
                self.counters["finished_requests"] += 1
            self._unsent.append((live, tok, lp, done, stopped.get(rid, "length") if done else None))

    def _flush_outputs(self) -> None:
        """Detokenize and deliver the tokens of the last step (one hand-over per sink)."""
        if not self._unsent:
            return
        outputs = []
        for live, tok, lp, done, reason in self._unsent:
            if not live.params.stop:  # with stop strings the text was advanced when the token came
                self._hit_stop_string(live, tok)
            outputs.append((live, self._output(live, [tok], lp, done, reason)))
        self._unsent = []
        self._deliver_many(outputs)

    def _hit_stop_string(self, live: _Live, tok: int) -> bool:
        """Advance the request's text by `tok`; True when a stop string appeared (only the tail is searched)."""
        if live.detok is None:
            if not self.tokenizer.available:
                return False
            live.detok = IncrementalText(self.tokenizer)
        delta = live.detok.add(tok)
        at = find_stop(live.detok.text, len(delta), live.params.stop)
        if at is not None:
            live.stop_text = live.detok.text[:at]
        return at is not None

    def _output(self, live: _Live, toks: list[int], lp, finished: bool, reason: str | None) -> StepOutput:
        """One increment of a request: the new token(s) and the text that became final with them."""
        req = live.request
        text = live.stop_text if live.stop_text is not None else (live.detok.text if live.detok else "")
        if not finished:
            hold = max((len(s) for s in live.params.stop), default=1) - 1  # maybe the start of a stop string
            text = text[:len(text) - hold] if hold else text
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                text = text[:-1]
        delta = text[len(live.sent):] if text.startswith(live.sent) else ""
        if delta:
            live.sent = text
        return StepOutput(req.request_id, toks, delta, [lp] if lp is not None else None, finished, reason,
                          len(req.prompt_token_ids), len(req.output_token_ids))

    def _deliver(self, live: _Live, item) -> None:
        """Hand an output to the request's event loop; a client whose loop is gone is dropped, not fatal."""
        self._deliver_many([(live, item)])

    def _deliver_many(self, items: list[tuple[_Live, object]]) -> None:
        """One hand-over per sink (event loop or pipe) for a whole step's outputs, not one per token."""
        by_sink: dict[object, list[tuple[_Live, object]]] = {}
        for live, item in items:
            by_sink.setdefault(live.sink.key, []).append((live, item))
        for batch in by_sink.values():
            try:
                batch[0][0].sink.deliver(batch)
            except (RuntimeError, OSError):  # its event loop was closed, or the pipe broke
                for live, _ in batch:
                    rid = live.request.request_id
                    if self._live.pop(rid, None) is not None:
                        self.scheduler.abort(rid)

    # --- the model -------------------------------------------------------------------------------------------
    def _model_forward(self, batch: PagedBatch, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits of the given rows of the flattened batch (every row when None; no LM head for an empty
        selection). Runs eagerly, or inside a CUDA graph capture (no host synchronisation in here). Under
        pipeline parallelism each rank runs its stage; rank 0 gets the logits."""
        ex, cfg, grp = self.executor, self.model_config, self.tp
        staged = grp is not None and grp.layout.pp > 1
        rope = rope_cos_sin(ex.inv_freq, batch.positions, self.dtype) if ex.inv_freq is not None else None
        x = logits = None
        for layer, w in ex.stream_layers():
            if layer.kind == "embed":
                if staged and not grp.layout.is_first:
                    x = grp.recv_hidden((1, batch.slots.numel(), cfg.hidden_size), self.dtype, self.device)
                else:
                    x = ex.embed_batch(layer, w, batch.ids, batch.positions)
            elif layer.kind == "head":
                if staged:
                    grp.pass_on(x, batch.sample_rows)
                if rows is None or rows.numel():  # rank 0 (the driver) only: workers pass no rows
                    if staged:  # the last stage has the final hidden states of these rows
                        h = grp.recv_sampled(rows.numel(), cfg.hidden_size, self.dtype, self.device)
                    else:
                        h = x[0] if rows is None else x[0, rows]
                    logits = lm_head(cfg, w, h)
            else:
                x = decoder_layer(cfg, w, x, rope, paged_attend(self.kv.layer_slots(layer.index), batch),
                                  reduce=self._reduce)
        return logits

    def _execute(self, seqs: list[SeqChunk], swap_out: list, swap_in: list, swap_out_ahead: list,
                 swap_in_ahead: list, sample: bool) -> tuple[PagedBatch | None, torch.Tensor | None]:
        """A step's device work, the same on every tensor-parallel rank: block swaps, then the forward.
        Returns the batch and the logits of its sampled rows (none when `sample` is False).

        The copies this step needs are ordered before its compute; the copies ahead of need (blocks this
        step does not touch) are issued once the forward is queued, behind a marker of the work before it, so
        on a GPU they run on the copy stream while this step computes (issued before the forward they would
        finish while the host is still building the batch, overlapping nothing), and the next step's
        `finish_pending` waits for them."""
        self.kv.finish_pending()
        self.kv.swap(swap_out, swap_in, wait=False)
        self.kv.order_before_compute()
        before_forward = self.kv.mark()
        batch, logits = None, None
        if seqs:
            batch = PagedBatch.build(seqs, self.config.block_size, self.device)
            rows = batch.sample_rows if sample else batch.sample_rows[:0]
            if self.graphs is not None and self.graphs.applies(batch):
                logits = self.graphs.run(batch)[rows]
            else:
                logits = self._model_forward(batch, rows)
        self.kv.swap(swap_out_ahead, swap_in_ahead, wait=False, after=before_forward)
        return batch, logits

    def run_worker(self) -> None:
        """A parallel rank other than 0: execute rank 0's plans until it sends None."""
        if self.tp is None or self.tp.is_driver:
            raise RuntimeError("run_worker() is for parallel ranks other than 0")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while (plan := self.tp.broadcast_plan(None)) is not None:
            self._execute(*plan, sample=False)
        self.executor.close()
        self.tp.leave()

    def _sample(self, scheduled, batch: PagedBatch, logits) -> dict[str, tuple[int, dict[int, float] | None]]:
        sampled_ids = [scheduled[i].request.request_id for i in batch.sampled]
        if not sampled_ids:
            return {}
        lives = [self._live[r] for r in sampled_ids]
        nlp = max((lv.params.logprobs for lv in lives if lv.params.logprobs is not None), default=None)
        res = sample(logits, [lv.params for lv in lives], [lv.generator for lv in lives], nlp)
        out = {}
        for i, (rid, lv) in enumerate(zip(sampled_ids, lives)):
            lp = logprob_entry(res, i, lv.params.logprobs) if lv.params.logprobs is not None else None
            out[rid] = (res.token_ids[i], lp)
        return out


async def stream_outputs(accepted, queue: asyncio.Queue, abandon) -> AsyncIterator[StepOutput]:
    """A request's outputs from its queue until the finished one. `accepted` raises the admission error
    (queue full, too large) before any output; a stream closed early calls `abandon` (abort, frees blocks).

    Outputs that queued up while the consumer was busy come out merged into one (several tokens), so a
    client that falls behind costs the server one chunk per wake-up instead of one per token."""
    done = False
    held: BaseException | None = None
    try:
        try:
            await accepted
        except (QueueFullError, RequestError):
            done = True  # never admitted: nothing to abort
            raise
        while True:
            out = held if held is not None else await queue.get()
            held = None
            if isinstance(out, BaseException):
                raise out
            while not out.finished and not queue.empty():
                nxt = queue.get_nowait()
                if isinstance(nxt, BaseException):
                    held = nxt  # deliver what came before it first
                    break
                out = merge_outputs(out, nxt)
            done = out.finished
            yield out
            if done:
                return
    finally:
        if not done:
            abandon()


def merge_outputs(a: StepOutput, b: StepOutput) -> StepOutput:
    """`a` followed by `b` of the same request, as one output."""
    logprobs = (a.logprobs or []) + (b.logprobs or []) if (a.logprobs or b.logprobs) else None
    return StepOutput(a.request_id, a.new_token_ids + b.new_token_ids, a.text_delta + b.text_delta, logprobs,
                      b.finished, b.finish_reason, b.num_prompt_tokens, b.num_output_tokens)


class LoopSink:
    """Outputs for requests made on one asyncio event loop: one thread-safe wake-up per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.key = loop

    def deliver(self, batch: list[tuple[_Live, object]]) -> None:
        self.key.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[_Live, object]]) -> None:
    """On a request's event loop: queue each output for its request."""
    for live, item in batch:
        live.queue.put_nowait(item)

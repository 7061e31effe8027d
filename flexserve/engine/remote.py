"""The serving engine in its own process, behind the same interface as `AsyncEngine`.

Why: in one process the engine thread (scheduling, batch building, detokenization) and the HTTP server's event
loop (one SSE chunk per token per request) share one interpreter lock. On an H100 at batch 256 the engine
alone steps in 29 ms, but with the server beside it a step takes 50 ms (bench/RESULTS.md section 4a). In two
processes both loops run at once.

The child process runs an `AsyncEngine` whose outputs go to a pipe: one message per step with every
request's output (`PipeSink`). The parent's `EngineProcess` has the methods the server uses (`generate`,
`abort`, `validate`, `stats`, `start`, `shutdown`, `model_config`, `tokenizer`, ...); a reader thread hands
each step's outputs to the event loops that asked, one wake-up per loop. Prompts are validated in the parent
(same `fit_prompt`), so bad requests never cross the pipe.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import threading
from typing import AsyncIterator

from ..errors import RequestError
from .sampling import SamplingParams
from .config import EngineConfig
from .front import EngineFront
from .outputs import StepOutput
from .streaming import stream_outputs

_READY_TIMEOUT_S = 1800  # loading a large model (or pinning its host copy) can take minutes


_STATS_EVERY_S = 0.05  # the child pushes engine stats this often; /metrics reads the latest, never waits


class PipeSink:
    """Engine-process side: a step's outputs as one message to the parent."""

    def __init__(self, conn, lock: threading.Lock):
        self.key = conn
        self._lock = lock

    def deliver(self, batch) -> None:
        items = [(live.request.request_id, _portable(item) if isinstance(item, BaseException) else item)
                 for live, item in batch]
        with self._lock:
            self.key.send(("out", items))


def _engine_main(config: EngineConfig, conn) -> None:
    """The child process: build the engine, report, then serve commands until shutdown."""
    import signal

    from .serving import AsyncEngine

    # Ctrl-C in a terminal reaches the whole process group: the parent drains the server and then shuts this
    # engine down over the pipe, so the child must not die of the same SIGINT mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    try:
        engine = AsyncEngine(config)
    except BaseException as e:  # the parent re-raises it: same error as an in-process engine would give
        conn.send(("error", _portable(e)))
        return
    lock = threading.Lock()
    sink = PipeSink(conn, lock)

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    send(("ready", {"model_path": engine.model_path, "model_config": engine.model_config,
                    "model_name": engine.model_name, "device": str(engine.device),
                    "settings": engine.settings, "dtype": engine.dtype, "rates": engine.rates}))
    engine.start()
    failure_sent = False
    try:
        while True:
            if not failure_sent and engine.error is not None:  # the engine thread died: tell the parent once
                send(("failed", _portable(engine.error)))
                failure_sent = True
            if not conn.poll(_STATS_EVERY_S):
                try:
                    send(("stats", engine.stats()))
                except RuntimeError:  # a table changed under the snapshot: next time
                    pass
                continue
            try:
                msg = conn.recv()
            except EOFError:  # the parent died: stop without draining
                msg = ("shutdown", False, 0.0)
            kind = msg[0]
            if kind == "add":
                _, rid, ids, params = msg
                fut = engine.submit(ids, params, rid, sink)
                fut.add_done_callback(lambda f, rid=rid: send(("accepted", rid, _portable(f.exception()))))
            elif kind == "abort":
                engine.abort(msg[1])
            elif kind == "shutdown":
                asyncio.run(engine.shutdown(drain=msg[1], timeout=msg[2]))
                send(("closed", _portable(engine.error)))
                return
    except (BrokenPipeError, EOFError, OSError):  # the parent is gone: nobody left to serve
        engine._stop = True


def make_engine(config: EngineConfig, separate_process: bool | None = None):
    """The engine a server runs: in a child process (`EngineProcess`) or in this one (`AsyncEngine`).

    None picks: a child process on a GPU (measured 7% more throughput at 256 streams on an H100, bench/RESULTS.md
    4a, since HTTP streaming and the engine loop then do not share one interpreter lock), this process on a
    CPU (the model's matmuls, not Python, bound the step there, and a child costs a second start-up).
    Tensor/pipeline parallelism needs the engine in the torchrun ranks themselves, so it runs in-process."""
    import torch

    from ..errors import PolicyError
    from .serving import AsyncEngine

    parallel = config.parallel
    if separate_process and parallel:
        raise PolicyError("--engine-process does not combine with --tensor-parallel/--pipeline-parallel (the "
                          "torchrun ranks hold the engine)")
    if separate_process is None:
        on_gpu = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        separate_process = on_gpu and not parallel
    return EngineProcess(config) if separate_process else AsyncEngine(config)


class EngineProcess(EngineFront):
    """`AsyncEngine`'s interface, with the engine running in a child process (see module docstring)."""

    tp = None  # tensor parallelism runs in-process (the torchrun ranks are the processes)

    def __init__(self, config: EngineConfig):
        from ..tokenizer import Tokenizer

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.config = config
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_main, args=(config, child), name="flexserve-engine", daemon=True)
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(_READY_TIMEOUT_S):
                raise RuntimeError("the engine process did not start in time")
            try:
                kind, info = self._conn.recv()
            except EOFError:
                raise RuntimeError(f"the engine process died while loading (exit code "
                                   f"{self._proc.exitcode})") from None
            if kind == "error":
                raise info
            self.model_path, self.model_config = info["model_path"], info["model_config"]
            self.model_name, self.device, self.settings = info["model_name"], info["device"], info["settings"]
            self.dtype, self.rates = info["dtype"], info["rates"]
            self.tokenizer = Tokenizer(self.model_path, self.model_config.vocab_size)
        except BaseException:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
            raise
        self.error: BaseException | None = None
        self._send_lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._accepts: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stats: dict | None = None
        self._stats_ready = threading.Event()
        self._closed: concurrent.futures.Future = concurrent.futures.Future()
        self._ids = itertools.count()
        self._accepting = True
        self._reader = threading.Thread(target=self._read, name="flexserve-engine-pipe", daemon=True)
        self._reader.start()

    # --- the server's interface ------------------------------------------------------------------------------
    def start(self) -> None:
        """The engine loop already runs in the child process."""

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """As `AsyncEngine.generate`: errors before the first output; closing early aborts the request."""
        params, rid = self._prepare(prompt_token_ids, params, request_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._streams[rid] = (loop, queue)
        self._accepts[rid] = (loop, accepted)
        try:
            self._send(("add", rid, list(prompt_token_ids), params))
            async for out in stream_outputs(accepted, queue, lambda: self.abort(rid)):
                yield out
        finally:
            self._streams.pop(rid, None)
            self._accepts.pop(rid, None)

    def abort(self, request_id: str) -> None:
        try:
            self._send(("abort", request_id))
        except OSError:  # the engine process is gone: nothing left to free
            pass

    def stats(self) -> dict:
        """The engine's counters as of at most ~50 ms ago (the child pushes them; nothing waits on the pipe)."""
        if not self._stats_ready.wait(10):
            raise RuntimeError("the engine process has not reported its stats")
        return dict(self._stats)

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        self._accepting = False
        if not self._closed.done():
            try:
                self._send(("shutdown", drain, timeout))
            except OSError:
                pass
            await asyncio.wrap_future(self._closed)
        await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 30)

    def release_memory(self) -> None:
        """The child's memory went with the child."""

    # --- plumbing --------------------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read(self) -> None:
        """The reader thread: route every message from the child to whoever waits for it."""
        error: BaseException | None = None
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "out":
                    self._route(msg[1])
                elif kind == "accepted":
                    self._resolve_accept(msg[1], msg[2])
                elif kind == "stats":
                    self._stats = msg[1]
                    self._stats_ready.set()
                elif kind == "failed":  # the engine thread died; the child stays to answer and to shut down
                    self.error = msg[1]
                    self._end_all(RuntimeError(f"engine failed: {msg[1]}"))
                elif kind == "closed":
                    error = msg[1]
                    break
        except (EOFError, OSError):
            error = RuntimeError(f"the engine process exited (code {self._proc.exitcode})")
        except BaseException as e:  # a message that could not be read: never leave waiters hanging
            error = RuntimeError(f"the engine pipe failed: {e!r}")
        finally:
            self.error = self.error or error
            self._end_all(error or RequestError("the engine was shut down before this request finished"))
            if not self._closed.done():
                self._closed.set_result(None)

    def _end_all(self, error: BaseException) -> None:
        """End every open stream and pending admission with `error`."""
        self._route([(rid, error) for rid in list(self._streams)])
        for rid in list(self._accepts):
            self._resolve_accept(rid, error)

    def _route(self, outputs: list[tuple[str, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, object]]] = {}
        for rid, item in outputs:
            target = self._streams.get(rid)
            if target is not None:
                by_loop.setdefault(target[0], []).append((rid, target[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_each, items)
            except RuntimeError:  # that client's loop is closed: stop generating for it
                for rid, _, _ in items:
                    self._streams.pop(rid, None)
                    self.abort(rid)

    def _resolve_accept(self, rid: str, error: BaseException | None) -> None:
        target = self._accepts.get(rid)
        if target is None:
            return
        loop, fut = target

        def settle() -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(None)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass


def _portable(error: BaseException | None) -> BaseException | None:
    """`error` if it survives pickling, else a RuntimeError with its message (so the pipe never breaks)."""
    import pickle

    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(str(error))


def _put_each(items: list[tuple[str, asyncio.Queue, object]]) -> None:
    for _, queue, item in items:
        queue.put_nowait(item)

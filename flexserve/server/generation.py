"""One API request as a set of engine requests (n choices for each prompt), merged into one stream.

Each engine request is consumed by its own task that forwards outputs to a queue, so choices interleave in the
order the engine produces them. `start()` waits until every engine request has produced its first output (or
failed), so that a validation error, a full queue or an over-long prompt becomes an HTTP error status before any
byte of a response is sent. `close()` cancels whatever is still running: cancelling a task closes its engine
generator, which aborts the engine request and frees its KV blocks; `engine.abort` is also called directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine.sampling import SamplingParams
from .metrics import ServerMetrics


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Choice:
    """One engine request (one choice of the response) and everything it produced so far."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    first_token_time: float | None = None
    is_started: bool = False  # produced an output, ended or failed
    is_failed: bool = False  # rejected by the engine (the error went to the client)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class Generation:
    """The engine requests behind one API request; iterate `events()` after `start()`, always `close()`."""

    def __init__(self, engine, metrics: ServerMetrics | None, choices: list[Choice]):
        self.engine = engine
        self.metrics = metrics
        self.choices = choices
        self.arrival_time = time.monotonic()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._direct: AsyncIterator | None = None  # a single choice's engine stream, read without a relay task
        self._buffer: list[tuple[Choice, object]] = []
        self._num_ended = 0
        self._closed = False

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens counted once per distinct prompt (OpenAI counts a prompt once whatever n is)."""
        seen: dict[int, int] = {}
        for c in self.choices:
            seen.setdefault(id(c.prompt_ids), len(c.prompt_ids))
        return sum(seen.values())

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    async def _pump(self, choice: Choice) -> None:
        try:
            async for out in self.engine.generate(choice.prompt_ids, choice.params, request_id=choice.request_id):
                self._queue.put_nowait((choice, out, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which turns it into an HTTP error
            self._queue.put_nowait((choice, None, e))
        else:
            self._queue.put_nowait((choice, None, None))

    async def start(self) -> None:
        """Submit every choice; return once each has produced an output; raise the first error (all aborted)."""
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(self.num_prompt_tokens)
        if len(self.choices) == 1:  # the common case: one hop less per token (no relay task and queue)
            c = self.choices[0]
            self._direct = self.engine.generate(c.prompt_ids, c.params, request_id=c.request_id)
        else:
            self._tasks = [asyncio.create_task(self._pump(c)) for c in self.choices]
        try:
            while not all(c.is_started for c in self.choices):
                item = await self._next()
                if item is not None:
                    self._buffer.append(item)
        except BaseException:
            self.close()
            raise

    async def _next(self) -> tuple[Choice, object] | None:
        """The next output (recorded in its choice), None for an engine request that ended; raises its error."""
        choice, out, err = await (self._read_direct() if self._direct is not None else self._queue.get())
        choice.is_started = True
        if err is not None:
            choice.is_failed = True
            raise err
        if out is None:
            self._num_ended += 1
            return None
        self._record(choice, out)
        return choice, out

    async def _read_direct(self) -> tuple[Choice, object, BaseException | None]:
        """What `_pump` would have queued, read straight from the single choice's engine stream."""
        try:
            return self.choices[0], await self._direct.__anext__(), None
        except StopAsyncIteration:
            return self.choices[0], None, None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return self.choices[0], None, e

    def _record(self, choice: Choice, out) -> None:
        now = time.monotonic()
        new = list(out.new_token_ids)
        choice.token_ids.extend(new)
        choice.text.append(out.text_delta)
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
        choice.num_output_tokens = out.num_output_tokens
        m = self.metrics
        if new and choice.first_token_time is None:
            choice.first_token_time = now
            if m is not None:
                m.ttft.observe(now - self.arrival_time)
        if m is not None and new:
            m.token_rate.add(len(new), now)
        if out.finished:
            choice.finish_reason = out.finish_reason or "stop"
            if m is not None:
                m.e2e.observe(now - self.arrival_time)
                if choice.first_token_time is not None and choice.num_output_tokens > 1:
                    m.tpot.observe((now - choice.first_token_time) / (choice.num_output_tokens - 1))
                m.finished.labels(choice.finish_reason).inc()

    async def events(self) -> AsyncIterator[tuple[Choice, object]]:
        """(choice, StepOutput) pairs until every engine request has finished."""
        while self._buffer:
            yield self._buffer.pop(0)
        while self._num_ended < len(self.choices):
            item = await self._next()
            if item is not None:
                yield item

    async def collect(self) -> None:
        """Run to the end (non-streaming responses)."""
        async for _ in self.events():
            pass

    def close(self) -> None:
        """Cancel and abort every engine request that has not finished. Synchronous on purpose: it runs in
        `finally` blocks of cancelled tasks, where an `await` would be cancelled again."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            if not task.done():
                task.cancel()
        if self._direct is not None:  # close the engine stream now rather than whenever it is collected
            with contextlib.suppress(RuntimeError):  # no running loop (or the stream is mid-step): GC closes it
                asyncio.get_running_loop().create_task(_aclose_quietly(self._direct))
        for c in self.choices:
            if not c.is_finished:
                with contextlib.suppress(Exception):  # the request may never have reached the engine
                    self.engine.abort(c.request_id)
                if self.metrics is not None and c.is_started and not c.is_failed:
                    self.metrics.finished.labels("abort").inc()


async def _aclose_quietly(stream) -> None:
    with contextlib.suppress(RuntimeError, asyncio.CancelledError):
        await stream.aclose()

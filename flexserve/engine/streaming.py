"""Outputs on their way to clients: per-request streams on asyncio event loops, and what merges them.

The engine thread hands each step's outputs to a sink per event loop (`LoopSink`: one thread-safe wake-up for
all the loop's requests); each request's queue is read by `stream_outputs`, which the server iterates.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Callable

from ..errors import RequestError
from ..scheduler import QueueFullError
from .outputs import StepOutput

if TYPE_CHECKING:
    from .output_processor import LiveRequest


async def stream_outputs(accepted, queue: asyncio.Queue, abandon: Callable[[], None]) -> AsyncIterator[StepOutput]:
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

    def deliver(self, batch: list[tuple[LiveRequest, StepOutput | BaseException]]) -> None:
        self.key.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[LiveRequest, StepOutput | BaseException]]) -> None:
    """On a request's event loop: queue each output for its request."""
    for live, item in batch:
        live.queue.put_nowait(item)

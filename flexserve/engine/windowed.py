"""Offline generation with StreamingLLM's window: `LLM(sliding_window=W, attention_sinks=N)`.

A window needs a cache that forgets: the paged KV pool releases the blocks no query can see any more, the
dense cache of the offloading executor cannot. So an `LLM` with a window runs its prompts through the serving
engine (continuous batching over the paged pool) in this process, and turns the streamed outputs back into the
offline API's `RequestOutput`s."""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Iterator

from ..errors import RequestError
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .serving import AsyncEngine, EngineConfig


@dataclass
class WindowedRequest:
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams


class WindowedGenerator:
    """A serving engine that `LLM.generate` drives offline (started on first use, shut down by `close`)."""

    def __init__(self, config: EngineConfig):
        self.engine = AsyncEngine(config)
        self._started = False

    def generate(self, requests: list[WindowedRequest], ids: Iterator[int]) -> list[RequestOutput]:
        """Every request (and each of its `n` samples) at once; outputs in request order, ids drawn from `ids`."""
        for r in requests:
            if r.params.prompt_logprobs is not None:
                raise RequestError("prompt_logprobs is not available with a sliding window")
        if not self._started:
            self.engine.start()
            self._started = True

        async def one(ids: list[int], params: SamplingParams, index: int) -> CompletionOutput:
            toks, text, logprobs, out = [], "", [], None
            async for out in self.engine.generate(ids, params):
                toks += out.new_token_ids
                text += out.text_delta
                logprobs += out.logprobs or []
            want = params.logprobs is not None
            cum = sum(lp[t] for t, lp in zip(toks, logprobs)) if want else None
            return CompletionOutput(index, text, toks, cum, logprobs if want else None, out.finish_reason)

        async def run() -> list[list[CompletionOutput]]:
            per_request = []
            for r in requests:
                samples = [dataclasses.replace(r.params, n=1, seed=None if r.params.seed is None else r.params.seed + i)
                           for i in range(r.params.n)]
                per_request.append([one(r.prompt_ids, p, i) for i, p in enumerate(samples)])
            flat = await asyncio.gather(*(c for cs in per_request for c in cs))
            at, grouped = 0, []
            for cs in per_request:
                grouped.append(list(flat[at:at + len(cs)]))
                at += len(cs)
            return grouped

        outs = asyncio.run(run())
        return [RequestOutput(str(next(ids)), r.prompt, r.prompt_ids, o) for r, o in zip(requests, outs)]

    def close(self) -> None:
        """Stop the engine thread (if it ran) and release the model's executor."""
        asyncio.run(self.engine.shutdown(drain=False))

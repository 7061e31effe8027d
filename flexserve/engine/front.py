"""What every serving-engine front end does before a request reaches an engine loop: the checks, the request id,
and the start-up warm-up. Shared by this process's `AsyncEngine` and the child-process `remote.EngineProcess`."""
from __future__ import annotations

import asyncio
import uuid

from ..errors import FlexServeError, RequestError
from .sampling import SamplingParams, fit_prompt


class EngineFront:
    """Mixed into an engine front end that has `config`, `model_config`, `error`, `_accepting`, `_ids` and
    `generate`."""

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Reject what cannot run; clip max_tokens to the context window (none with a sliding window).
        Returns the params to use."""
        return fit_prompt(self.model_config, prompt_token_ids, params, unbounded=self.config.sliding_window > 0)

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

"""From sampled tokens to what clients receive: incremental text, stop strings, `StepOutput`s and their delivery.

The engine loop asks `stop_reason` whether a token ends its request (a stop token; a stop string needs the
text, so a request with stop strings is detokenized as each token arrives). The rest waits: a step's tokens
are `add`ed, and `flush` detokenizes and delivers them while the next step's forward runs on the GPU, with one
hand-over per sink (the event loop of `streaming.LoopSink`, or the pipe of `remote.PipeSink`).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import torch

from ..scheduler import Request
from ..tokenizer import Tokenizer
from .detokenize import IncrementalText, find_stop
from .outputs import StepOutput
from .sampling import SamplingParams


@dataclass
class LiveRequest:
    """Engine-side state of one request."""

    request: Request
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    sink: object  # where its outputs go: `deliver(batch)`, and a `key` shared by the requests of one hand-over
    queue: asyncio.Queue | None  # the request's queue on its event loop (None for a pipe sink)
    detok: IncrementalText | None = None  # the output's text so far
    sent: str = ""  # text already delivered
    stop_text: str | None = None  # the final text when a stop string ended the request

    @property
    def request_id(self) -> str:
        return self.request.request_id


class OutputProcessor:
    """Text and delivery of the serving engine's outputs (see module docstring). `on_lost(live)` is told of a
    request whose client is gone (its event loop closed, its pipe broke), so the engine can stop serving it."""

    def __init__(self, tokenizer: Tokenizer, on_lost: Callable[[LiveRequest], None]):
        self.tokenizer = tokenizer
        self.on_lost = on_lost
        self._unsent: list[tuple[LiveRequest, int, dict[int, float] | None, bool, str | None]] = []

    def stop_reason(self, live: LiveRequest, tok: int) -> str | None:
        """"stop" when `tok` ends the request (one of its stop tokens, or the end of a stop string), else None."""
        if tok in live.stop_ids or (live.params.stop and self._advance_text(live, tok)):
            return "stop"
        return None

    def add(self, live: LiveRequest, tok: int, logprobs: dict[int, float] | None, finished: bool,
            reason: str | None) -> None:
        """A token of this step, delivered at the next `flush`."""
        self._unsent.append((live, tok, logprobs, finished, reason))

    def flush(self) -> None:
        """Detokenize and deliver the tokens added since the last flush (one hand-over per sink)."""
        if not self._unsent:
            return
        outputs = []
        for live, tok, lp, done, reason in self._unsent:
            if not live.params.stop:  # with stop strings the text was advanced when the token came
                self._advance_text(live, tok)
            outputs.append((live, self.output(live, [tok], lp, done, reason)))
        self._unsent = []
        self.deliver(outputs)

    def _advance_text(self, live: LiveRequest, tok: int) -> bool:
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

    def output(self, live: LiveRequest, toks: list[int], logprobs: dict[int, float] | None, finished: bool,
               reason: str | None) -> StepOutput:
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
        return StepOutput(req.request_id, toks, delta, [logprobs] if logprobs is not None else None, finished,
                          reason, len(req.prompt_token_ids), len(req.output_token_ids))

    def deliver(self, items: list[tuple[LiveRequest, StepOutput | BaseException]]) -> None:
        """One hand-over per sink (event loop or pipe) for a whole step's outputs, not one per token; a client
        whose loop or pipe is gone is dropped (`on_lost`), not fatal."""
        by_sink: dict[object, list[tuple[LiveRequest, StepOutput | BaseException]]] = {}
        for live, item in items:
            by_sink.setdefault(live.sink.key, []).append((live, item))
        for batch in by_sink.values():
            try:
                batch[0][0].sink.deliver(batch)
            except (RuntimeError, OSError):  # its event loop was closed, or the pipe broke
                for live, _ in batch:
                    self.on_lost(live)

"""/v1/completions and /v1/chat/completions: prompts to engine requests, engine outputs to OpenAI responses.

Both endpoints share one pipeline (`serve_request`); a small formatter per endpoint shapes choices, chunks and
log-probabilities the way OpenAI's API does. Streams are server-sent events: `data: {json}\\n\\n` per chunk,
then `data: [DONE]\\n\\n`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ModelLoadError
from .errors import APIError, from_exception
from .generation import Choice, Generation, random_id
from .protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def until_disconnected(request: Request, awaitable) -> object:
    """Await `awaitable`, cancelling it if the client disconnects first (then raise `ClientDisconnected`)."""
    task = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left (or this handler was cancelled): stop the work
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task  # let its cleanup (aborting engine requests) run before answering
        raise ClientDisconnected()
    return task.result()


class CompletionFormat:
    """Shapes of /v1/completions objects."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, tokenizer, body: CompletionRequest):
        self.tokenizer, self.body = tokenizer, body
        self._offsets: dict[int, int] = {}

    def token_str(self, token_id: int) -> str:
        """The token's text; `token_id:N` for a model without a tokenizer (vLLM's convention)."""
        try:
            return self.tokenizer.token_str(token_id)
        except ModelLoadError:
            return f"token_id:{token_id}"

    def logprobs(self, choice: Choice, entries: list[dict[int, float]], token_ids: list[int]) -> dict | None:
        if self.body.logprobs is None:
            return None
        k = self.body.logprobs
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, entry in zip(token_ids, entries):
            s = self.token_str(tok)
            offset = self._offsets.get(choice.index, 0)
            self._offsets[choice.index] = offset + len(s)
            tokens.append(s)
            token_lps.append(entry.get(tok))
            offsets.append(offset)
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            tops.append({self.token_str(t): lp for t, lp in best} if k else None)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def role_chunk(self, choice: Choice) -> dict | None:
        return None

    def delta(self, choice: Choice, out) -> dict:
        return {"index": choice.index, "text": out.text_delta,
                "logprobs": self.logprobs(choice, out.logprobs or [], list(out.new_token_ids)),
                "finish_reason": choice.finish_reason if out.finished else None}

    def final(self, choice: Choice) -> dict:
        self._offsets.pop(choice.index, None)
        return {"index": choice.index, "text": "".join(choice.text),
                "logprobs": self.logprobs(choice, choice.logprobs, choice.token_ids),
                "finish_reason": choice.finish_reason}


class ChatFormat(CompletionFormat):
    """Shapes of /v1/chat/completions objects."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def logprobs(self, choice: Choice, entries: list[dict[int, float]], token_ids: list[int]) -> dict | None:
        if not self.body.logprobs:
            return None
        k = self.body.top_logprobs or 0

        def item(tok: int, lp: float) -> dict:
            s = self.token_str(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = []
        for tok, entry in zip(token_ids, entries):
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append({**item(tok, entry.get(tok)), "top_logprobs": [item(t, lp) for t, lp in best]})
        return {"content": content}

    def role_chunk(self, choice: Choice) -> dict:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, choice: Choice, out) -> dict:
        delta = {"content": out.text_delta} if out.text_delta else {}
        return {"index": choice.index, "delta": delta,
                "logprobs": self.logprobs(choice, out.logprobs or [], list(out.new_token_ids)),
                "finish_reason": choice.finish_reason if out.finished else None}

    def final(self, choice: Choice) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": self.logprobs(choice, choice.logprobs, choice.token_ids),
                "finish_reason": choice.finish_reason}


def build_choices(state, body, prompts: list[list[int]], request_id: str) -> list[Choice]:
    """n choices per prompt, index = prompt index * n + j (OpenAI's order)."""
    ctx = state.max_position
    is_chat = isinstance(body, ChatCompletionRequest)
    requested = body.requested_max_tokens if is_chat else body.max_tokens
    num_logprobs = body.num_logprobs if is_chat else body.logprobs
    choices = []
    for p, ids in enumerate(prompts):
        # Chat defaults to "as long as fits" like OpenAI; the engine clips any max_tokens to the window and
        # rejects (413) a prompt that leaves no room.
        max_tokens = requested or (max(1, ctx - len(ids)) if is_chat else DEFAULT_COMPLETION_MAX_TOKENS)
        for j in range(body.n):
            index = p * body.n + j
            choices.append(Choice(index, f"{request_id}-{index}", ids,
                                  body.sampling_params(max_tokens, num_logprobs, j)))
    return choices


def usage(gen: Generation) -> dict:
    p, c = gen.num_prompt_tokens, gen.num_output_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def serve_request(state, body: CompletionRequest | ChatCompletionRequest, request: Request):
    """The shared pipeline: check, tokenize, submit, then stream or collect."""
    body.check()
    state.check_model(body.model)
    if state.is_shutting_down:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    tok = state.engine.tokenizer
    if isinstance(body, ChatCompletionRequest):
        fmt: CompletionFormat = ChatFormat(tok, body)
        prompts = [tok.chat_prompt([m.as_template_input() for m in body.messages])]
    else:
        fmt = CompletionFormat(tok, body)
        prompts = body.prompts(tok.encode)
    request_id = random_id(fmt.id_prefix)
    gen = Generation(state.engine, state.metrics, build_choices(state, body, prompts, request_id))
    head = {"id": request_id, "created": int(time.time()), "model": state.model_name}
    try:
        await until_disconnected(request, gen.start())
    except ClientDisconnected:
        gen.close()
        return JSONResponse({}, status_code=499)
    if body.stream:
        return EventStream(stream(gen, fmt, head, body), gen.close)
    try:
        await until_disconnected(request, gen.collect())
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)
    finally:
        gen.close()
    choices = []
    for c in gen.choices:
        choice = fmt.final(c)
        if body.return_token_ids:
            choice.update(token_ids=c.token_ids, prompt_token_ids=c.prompt_ids)
        choices.append(choice)
    return JSONResponse({**head, "object": fmt.object, "choices": choices, "usage": usage(gen)})


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends, even when the client leaves before the body
    generator ever started (then the generator's own `finally` never runs)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(gen: Generation, fmt: CompletionFormat, head: dict, body) -> AsyncIterator[str]:
    """The SSE body. If the client disconnects, Starlette cancels this generator: `finally` aborts the engine
    requests still running, which frees their KV blocks."""
    chunk_head = {**head, "object": fmt.chunk_object}
    extra = {"usage": None} if body.include_usage else {}
    try:
        for c in gen.choices:
            role = fmt.role_chunk(c)
            if role is not None:
                yield _sse({**chunk_head, "choices": [role], **extra})
        async for choice, out in gen.events():
            piece = fmt.delta(choice, out)
            if body.return_token_ids:
                piece["token_ids"] = list(out.new_token_ids)
            if (piece.get("text") or piece.get("delta") or piece["finish_reason"] or piece["logprobs"]
                    or body.return_token_ids):
                yield _sse({**chunk_head, "choices": [piece], **extra})
        if body.include_usage:
            yield _sse({**chunk_head, "choices": [], "usage": usage(gen)})
    except Exception as e:  # an engine failure mid-stream: the status is already sent, so report in-band
        yield _sse(from_exception(e).body())
    finally:
        gen.close()
    yield "data: [DONE]\n\n"

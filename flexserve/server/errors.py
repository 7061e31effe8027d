"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every error a client can cause becomes one of these and leaves the server healthy: 400 (malformed JSON, bad
values, unsupported fields, a prompt over the context window or a request larger than the whole KV pool), 401
(API key), 404 (unknown model or route), 429 (queue full). Every 400 carries a `code` and, where one field is
at fault, its `param`, as OpenAI's do: a prompt over the context is `context_length_exceeded`, so OpenAI's
clients raise their `BadRequestError`. Anything else is a 500 and is logged.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FlexServeError, PromptTooLongError

logger = logging.getLogger("flexserve.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error response: raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# Request fields an engine error may be about: the message's first words name them.
_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "logprobs", "prompt_logprobs", "stop", "n", "seed",
           "prompt", "messages")


def _param_of(message: str, prompt_param: str) -> str | None:
    words = re.findall(r"[a-z_]+", message.lower())[:2]
    for word in words:
        if word in _FIELDS:
            return prompt_param if word in ("prompt", "messages") else word
    return None


def from_exception(e: BaseException, prompt_param: str = "prompt") -> APIError:
    """Map an engine, scheduler or validation error to its API error. `prompt_param` names the field that holds
    the prompt (`prompt`, or `messages` for a chat request)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValidationError):
        return from_validation_error(e)
    if isinstance(e, PromptTooLongError):
        return APIError(400, f"this model's maximum context length is exceeded: {e}", prompt_param,
                        "context_length_exceeded")
    status = getattr(e, "http_status", None)
    if status == 413:  # prompt + max_tokens could never fit the KV pool: say what the client can change
        detail = re.sub(r"^request '[^']*' needs", "it needs", str(e))
        return APIError(400, f"the prompt plus max_tokens does not fit this server's KV cache ({detail}): lower "
                             f"max_tokens or shorten the prompt", "max_tokens", "request_too_large")
    if status is None:
        status = 400 if isinstance(e, FlexServeError) else 500
    if status == 500:
        logger.exception("internal error", exc_info=e)
        return APIError(500, f"internal error: {type(e).__name__}", type="server_error")
    if status != 400:
        return APIError(status, str(e), getattr(e, "param", None), {429: "queue_full"}.get(status))
    param = getattr(e, "param", None) or _param_of(str(e), prompt_param)
    return APIError(400, str(e), param, getattr(e, "code", None) or "invalid_value")


def from_validation_error(e: ValidationError) -> APIError:
    """The first pydantic error, with the dotted field path as `param`."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err.get("loc", ()) if not _is_union_tag(str(x))]
    param = ".".join(loc) or None
    hint = next((FIELD_HINTS[part] for part in loc if part in FIELD_HINTS), None)
    message = hint or err.get("msg", "invalid value")
    return APIError(400, f"{param + ': ' if param else ''}{message}", param, "invalid_value")


# Fields whose type is a union, where pydantic's first complaint names only one of the accepted shapes.
FIELD_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts (this server takes text only)',
}


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member it tried in an error's location (`str`, `list[int]`, ...)."""
    return part in ("str", "int", "float", "bool", "none") or part.startswith(("list[", "dict[", "function-"))


def install_handlers(app: FastAPI, on_error: Callable[[APIError], None] | None = None) -> None:
    """Every exception that escapes a route becomes an OpenAI-format error; `on_error` sees each one."""

    def respond(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return respond(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    # Handlers keyed by a class below `Exception` answer without the traceback that Starlette logs (and
    # re-raises) for the catch-all `Exception` handler, which only sees real bugs.
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return respond(e)

    @app.exception_handler(FlexServeError)
    async def _user_error(_: Request, e: FlexServeError) -> JSONResponse:
        return respond(from_exception(e))

    @app.exception_handler(Exception)
    async def _any_error(_: Request, e: Exception) -> JSONResponse:
        return respond(from_exception(e))

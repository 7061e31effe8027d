"""Errors a client can cause at the scheduler; the server maps them to HTTP status codes."""
from __future__ import annotations

from ..errors import FlexServeError, RequestError


class QueueFullError(FlexServeError):
    """The bounded queue of requests not yet started is full: retry later (HTTP 429)."""

    http_status = 429


class RequestTooLargeError(RequestError):
    """Prompt plus `max_tokens` needs more KV blocks than the whole GPU pool holds, so it could never run
    (HTTP 413)."""

    http_status = 413

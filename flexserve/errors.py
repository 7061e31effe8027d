"""User-facing error types.

Every error a user can cause (bad path, corrupt file, impossible policy, bad sampling value, prompt too long)
is raised as a subclass of `FlexServeError`; the CLI prints its message and exits non-zero instead of
showing a traceback, and the HTTP server maps it to an OpenAI-format error.
"""
from __future__ import annotations


class FlexServeError(Exception):
    """Base class of every error caused by user input rather than a bug."""


class ModelLoadError(FlexServeError):
    """The model path is missing, the file is corrupt or truncated, or the architecture is unknown."""


class ConfigError(FlexServeError, ValueError):
    """An engine or scheduler setting out of range (a flag such as `--num-levels 0`)."""


class PolicyError(FlexServeError):
    """An offloading policy that is out of range or cannot fit the stated memory."""


class RequestError(FlexServeError):
    """A bad request: sampling values out of range, or a prompt longer than the context window."""


class PromptTooLongError(RequestError):
    """The prompt (plus the tokens to generate) does not fit the model's context window."""

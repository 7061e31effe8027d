"""Result objects: the offline API's (vLLM's shapes, which users already know) and the serving engine's stream."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token id: logprob}, chosen included
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or token that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = True
    metrics: dict = field(default_factory=dict)


@dataclass
class StepOutput:
    """One increment of a served request: the token(s) of a step and the text that became final with them."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int

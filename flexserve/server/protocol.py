"""Request bodies of the OpenAI-compatible API (pydantic), and their translation to `SamplingParams`.

Field names and ranges follow OpenAI's API. Extensions (vLLM's names): `top_k`, `ignore_eos` (generate exactly
`max_tokens`, as trace replay needs) and `return_token_ids` (add the generated token ids to each choice).
Unknown fields are ignored, as OpenAI clients send fields that do not change the result (`user`, ...).
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling import SamplingParams
from ..errors import RequestError


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise UnsupportedField("presence_penalty and frequency_penalty are not supported (use 0)",
                                   "presence_penalty" if self.presence_penalty else "frequency_penalty")
        if self.logit_bias:
            raise UnsupportedField("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options is only allowed with stream=true", "stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        """The parameters of choice `index` (of `n`): with a seed, choice i uses seed + i so the n choices
        differ yet the request is reproducible."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(n=1, max_tokens=max_tokens, seed=seed,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=-1 if self.top_k in (None, 0) else self.top_k,
                              stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs)


class FieldError(RequestError):
    """A bad value of one request field: HTTP 400 naming the field (`param`) with an OpenAI-style `code`."""

    code = "invalid_value"

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class UnsupportedField(FieldError):
    """A field we parse but do not implement: HTTP 400 naming the field."""

    code = "unsupported_parameter"


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self._check_unsupported()
        if self.echo:
            raise UnsupportedField("echo is not supported", "echo")
        if self.suffix:
            raise UnsupportedField("suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise UnsupportedField("best_of other than n is not supported", "best_of")

    def prompts(self, encode) -> list[list[int]]:
        """Every prompt as token ids: a string, a list of strings, a token id list, or a list of those."""
        p = self.prompt
        if isinstance(p, str):
            out = [encode(p)]
        elif not p:
            raise FieldError("prompt is empty", "prompt")
        elif all(isinstance(x, str) for x in p):
            out = [encode(x) for x in p]
        elif all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = [list(x) for x in p]
        if any(not ids for ids in out):
            raise FieldError("a prompt is empty", "prompt")
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list | None = None

    def check(self) -> None:
        self._check_unsupported()
        if self.tools:
            raise UnsupportedField("tools are not supported", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs needs logprobs=true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

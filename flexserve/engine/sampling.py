"""`SamplingParams` and the sampler: greedy, temperature, top-k, top-p, per-request seeds, log-probabilities.

The sampler works on a whole batch of logits at once. Rows with a seed draw their noise from their own CPU
generator, so a seeded request gives the same tokens whatever it is batched with and on whatever device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RequestError


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's field names)."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per generated token (0 = only the chosen one)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1 (off) or >= 1, got {self.top_k!r}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in 0..20, got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in 0..20, got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None = None  # of the chosen token, per row
    top: list[dict[int, float]] | None = None  # top alternatives per row
    chosen: torch.Tensor | None = None  # [B] int64 token_ids on the logits' device (to broadcast without a copy)
    extra: dict = field(default_factory=dict)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p applied row-wise to float logits [B, V]."""
    temps = torch.tensor([max(p.temperature, 1e-5) for p in params], dtype=logits.dtype, device=logits.device)
    logits = logits / temps[:, None]
    ks = [p.top_k for p in params]
    if any(k > 0 for k in ks):
        kk = torch.tensor([k if k > 0 else logits.shape[-1] for k in ks], device=logits.device)
        sorted_desc = logits.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (kk - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ps = [p.top_p for p in params]
    if any(p < 1 for p in ps):
        probs_sorted, order = logits.softmax(-1).sort(dim=-1, descending=True)
        cum = probs_sorted.cumsum(-1)
        top_p = torch.tensor(ps, dtype=cum.dtype, device=logits.device)[:, None]
        drop_sorted = (cum - probs_sorted) >= top_p  # keep the smallest prefix reaching top_p (at least one)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           num_logprobs: int | None = None) -> SampleResult:
    """Pick one token per row of `logits` [B, V]."""
    logits = logits.float()
    chosen = logits.argmax(-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        probs = _filter(logits[rows], [params[i] for i in random_rows]).softmax(-1).cpu()
        # Exponential race (Gumbel-max in disguise): argmax(p / E), E ~ Exp(1), one generator per row.
        noise = torch.empty_like(probs)
        for r, i in enumerate(random_rows):
            noise[r].exponential_(generator=generators[i])
        picks = (probs / noise).argmax(-1)
        chosen[rows] = picks.to(chosen.device)
    wait_for_device(chosen)
    result = SampleResult(chosen.tolist(), chosen=chosen)
    if num_logprobs is not None:
        lp = logits.log_softmax(-1)
        result.logprobs = lp.gather(1, chosen[:, None])[:, 0].tolist()
        if num_logprobs > 0:
            vals, idx = lp.topk(num_logprobs, dim=-1)
            result.top = [dict(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return result


class DeviceTokens:
    """Token ids picked on the device, on their way to the host behind an event: the host reads them later
    (`tolist`) while the device goes on with the next step, which takes them from `chosen` directly."""

    def __init__(self, chosen: torch.Tensor):
        self.chosen = chosen  # [B] int64 on the device
        self._event: torch.cuda.Event | None = None
        if chosen.is_cuda:
            self._host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
            self._host.copy_(chosen, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(chosen.device))
        else:
            self._host = chosen

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()  # without the interpreter lock, as `wait_for_device`
        return self._host.tolist()


def greedy_tokens(logits: torch.Tensor) -> DeviceTokens:
    """The argmax of each row of logits [B, V], without waiting for the device. Same tokens as `sample` for
    greedy rows (converting to float32 first would not change any comparison)."""
    return DeviceTokens(logits.argmax(-1))


def wait_for_device(t: torch.Tensor) -> None:
    """Block until the GPU work behind `t` is done, without holding the interpreter lock: `.tolist()` would
    wait inside a call that keeps it, and the HTTP server's thread could not stream tokens meanwhile."""
    if t.is_cuda:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))
        event.synchronize()


def make_generator(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    if seed is None:
        return fallback
    return torch.Generator().manual_seed(seed)


def fit_prompt(config, ids: list[int], params: SamplingParams, unbounded: bool = False) -> SamplingParams:
    """Reject prompts that cannot run (empty, out of vocabulary, no room for one new token in the context
    window) and clip max_tokens to the room left. Shared by the offline `LLM` and the serving engine.
    `unbounded`: a sliding window (StreamingLLM) keeps the cache bounded, so no context limit applies."""
    from ..errors import PromptTooLongError

    if not ids:
        raise RequestError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= config.vocab_size:
        raise RequestError(f"prompt token ids must be in 0..{config.vocab_size - 1}")
    if unbounded:
        return params
    room = config.max_position - len(ids)
    if room < 1:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the context window is {config.max_position} "
                                 f"(prompt plus at least one new token must fit)")
    if params.max_tokens > room:
        import dataclasses

        params = dataclasses.replace(params, max_tokens=room)
    return params


def stop_token_ids(config, params: SamplingParams) -> set[int]:
    """Token ids that end a sequence: the request's own, plus the model's eos unless `ignore_eos`."""
    ids = set(params.stop_token_ids or [])
    if not params.ignore_eos:
        ids.update(config.eos_ids)
    return ids


def logprob_entry(res: SampleResult, row: int, k: int) -> dict[int, float]:
    """{chosen token: logprob} plus the row's top-k alternatives, as both front ends report them."""
    entry = {res.token_ids[row]: res.logprobs[row]}
    if res.top is not None:
        entry.update(dict(list(res.top[row].items())[:k]))
    return entry

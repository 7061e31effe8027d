"""The generation loop of the offline runners: prefill, then decode steps, sampling and stopping.

The sequences of a `Block` are split into batches whose prompts are left-padded (`left_pad`), so one forward
serves every row of a batch and padded positions are masked out. `generate` asks a model for one step at a
time until every sequence has finished. What a step is depends on the model:

- the offloading executor (`engine.block`) runs every batch of the block in one zig-zag forward, then takes
  each batch's tokens;
- a pipeline stage (`parallel.pipeline`) runs its micro-batches one after another; the last stage samples,
  the others accept its tokens (a broadcast) only when a micro-batch comes round again, so that the stages
  work on different micro-batches at once.

Either way the per-sequence work is `Block`'s: `feeds` are each batch's next input, `sample` picks tokens with
each sequence's own parameters and generator, `accept` appends them, decides which sequences finished (stop
tokens, stop strings, max_tokens) and advances the batch's feed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .sampling import SampleResult, SamplingParams, logprob_entry, sample


@dataclass
class Sequence:
    """One sequence being generated (a request with n > 1 becomes n sequences)."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detok: object = None  # IncrementalText of the output, kept by whoever checks stop strings

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def left_pad(prompts: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, ...]:
    """Prompts left-padded to one length: (ids [B, L], positions [B, L], validity mask [B, L]).

    Positions count real tokens only (HF's convention), so a padded row sees the positions it would alone."""
    length = length or max(map(len, prompts))
    pad = [length - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)], dtype=torch.long)
    valid = torch.tensor([[False] * n + [True] * len(p) for n, p in zip(pad, prompts)])
    return ids, (valid.long().cumsum(-1) - 1).clamp(min=0), valid


@dataclass
class Feed:
    """One batch's next input, on the host."""

    ids: torch.Tensor  # [b, S] the padded prompts, then each row's newest token
    positions: torch.Tensor  # [b, S]
    valid: torch.Tensor  # [b, L] validity of every key position so far, the fed ones included
    padded: bool  # whether attention must mask with `valid`

    @classmethod
    def prompts(cls, prompts: list[list[int]], length: int | None = None) -> "Feed":
        ids, positions, valid = left_pad(prompts, length)
        return cls(ids, positions, valid, not bool(valid.all()))

    @property
    def key_valid(self) -> torch.Tensor | None:
        """The mask attention needs, or None when nothing is padded (the plain causal kernels)."""
        return self.valid if self.padded else None

    def advance(self, token_ids: list[int]) -> None:
        """Feed each row's new token next."""
        self.ids = torch.tensor(token_ids, dtype=torch.long)[:, None]
        self.positions = self.positions[:, -1:] + 1
        self.valid = torch.cat([self.valid, torch.ones(len(token_ids), 1, dtype=torch.bool)], dim=1)


class Block:
    """The sequences being generated together, in batches, and what happens when their tokens arrive.

    `shared_length` pads every batch to the block's longest prompt (one cache length for all batches, as the
    executor's zig-zag schedule needs; padding is then masked in every batch or in none); otherwise each
    batch is padded to its own longest prompt. `stop_check(seq) -> bool` tests stop strings (it needs the
    tokenizer, which the loop does not know)."""

    def __init__(self, batches: list[list[Sequence]], stop_check: Callable[[Sequence], bool] | None = None,
                 shared_length: bool = False):
        self.batches = batches
        self.stop_check = stop_check
        longest = max(len(s.prompt_ids) for b in batches for s in b) if shared_length else None
        self.feeds = [Feed.prompts([s.prompt_ids for s in b], longest) for b in batches]
        if shared_length:
            padded = any(f.padded for f in self.feeds)
            for f in self.feeds:
                f.padded = padded
        self.max_new = max(s.params.max_tokens for b in batches for s in b)
        self.wants_prompt_logprobs = any(s.params.prompt_logprobs is not None for b in batches for s in b)
        self.steps = 0  # forwards so far (the first is the prefill)

    @property
    def done(self) -> bool:
        return all(self.batch_done(k) for k in range(len(self.batches)))

    def batch_done(self, k: int) -> bool:
        return all(s.done for s in self.batches[k])

    def sample(self, k: int, logits: torch.Tensor) -> SampleResult:
        """Batch k's next tokens from its logits [b, V]; [b, S, V] at a prefill that also scores the prompt
        positions, whose log-probabilities are recorded first."""
        batch = self.batches[k]
        if logits.dim() == 3:
            _record_prompt_logprobs(batch, logits)
            logits = logits[:, -1]
        nlp = max((s.params.logprobs for s in batch if s.params.logprobs is not None), default=None)
        return sample(logits, [s.params for s in batch], [s.generator for s in batch], nlp)

    def accept(self, k: int, token_ids: list[int], result: SampleResult | None = None) -> None:
        """Append batch k's new tokens (one per row; finished rows ignore theirs), end the sequences that are
        done, and feed the tokens next. `result` (the sampler's, where it ran) carries log-probabilities."""
        for r, s in enumerate(self.batches[k]):
            if s.done:
                continue
            s.out_ids.append(token_ids[r])
            if result is not None and s.params.logprobs is not None:
                s.logprobs.append(logprob_entry(result, r, s.params.logprobs))
                s.cum_logprob += result.logprobs[r]
            self._check_finish(s)
        self.feeds[k].advance(token_ids)

    def take(self, k: int, logits: torch.Tensor) -> list[int]:
        """`sample` then `accept`; returns the tokens."""
        result = self.sample(k, logits)
        self.accept(k, result.token_ids, result)
        return result.token_ids

    def _check_finish(self, s: Sequence) -> None:
        tok = s.out_ids[-1]
        if tok in s.stop_ids:
            s.finish_reason, s.stop_reason = "stop", tok
        elif self.stop_check is not None and self.stop_check(s):
            s.finish_reason = "stop"
        elif len(s.out_ids) >= s.params.max_tokens:
            s.finish_reason = "length"


class Stepper(Protocol):
    def step(self, block: Block) -> None:
        """One forward of every unfinished batch of `block` (the prompts the first time), whose tokens are
        then taken (`Block.take`) or accepted from elsewhere (`Block.accept`)."""


def generate(model: Stepper, block: Block, on_step: Callable[[int], None] | None = None) -> None:
    """Step `model` until every sequence of `block` has finished. `on_step(n)` runs before the first step
    (n = 0) and after each (n steps done): progress bars, and benchmarks that time the prefill apart."""
    if on_step is not None:
        on_step(0)
    while not block.done:
        model.step(block)
        block.steps += 1
        if on_step is not None:
            on_step(block.steps)


def position_logprobs(logits: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """From the logits [n, V] at the positions of ids (n = len(ids)): the log-distributions of each next token
    [n - 1, V], and the log-probability of the token that came, log p(ids[i] | ids[:i]) for i >= 1 [n - 1]."""
    lp = logits[:-1].float().log_softmax(-1)
    return lp, lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0]


def _record_prompt_logprobs(batch: list[Sequence], logits: torch.Tensor) -> None:
    """Prompt log-probabilities of the rows that asked, from the prefill's logits [b, S, V] (left-padded)."""
    for r, s in enumerate(batch):
        k = s.params.prompt_logprobs
        if k is None:
            continue
        n = len(s.prompt_ids)
        rows, chosen = position_logprobs(logits[r, logits.shape[1] - n:], s.prompt_ids)
        tops = rows.topk(k, dim=-1) if k > 0 else None
        out: list[dict[int, float] | None] = [None]
        for i, (t, lp) in enumerate(zip(s.prompt_ids[1:], chosen.tolist())):
            entry = {t: lp}
            if tops is not None:
                entry.update(dict(zip(tops.indices[i].tolist(), tops.values[i].tolist())))
            out.append(entry)
        s.prompt_logprobs = out

"""Generation of one block of sequences on the offloading executor: left padding, prefill, decode, stopping.

Every sequence of the block shares one cache length (prompts are left-padded to the block's longest), so one
forward per step serves all GPU batches of the block, which is what the zig-zag schedule needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..offload.executor import OffloadExecutor
from .sampling import SamplingParams, logprob_entry, sample


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


def run_block(ex: OffloadExecutor, seqs: list[Sequence], gpu_batch_size: int, stop_check=None,
              progress=None) -> None:
    """Generate every sequence of one block to completion, in place.

    `stop_check(seq) -> bool` tests stop strings (it needs the tokenizer, which this module does not know);
    `progress(n)` is called once per decode step.
    """
    plen = max(len(s.prompt_ids) for s in seqs)
    max_new = max(s.params.max_tokens for s in seqs)
    batches = [seqs[i:i + gpu_batch_size] for i in range(0, len(seqs), gpu_batch_size)]
    state = ex.new_block([len(b) for b in batches], plen + max_new)
    ids, pos, valid = [], [], []
    for b in batches:
        i, p, v = left_pad([s.prompt_ids for s in b], plen)
        ids.append(i)
        pos.append(p)
        valid.append(v)
    try:
        _generate(ex, state, batches, seqs, ids, pos, valid, max_new, stop_check, progress)
    finally:
        ex.release_block(state)


def left_pad(prompts: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, ...]:
    """Prompts left-padded to one length: (ids [B, L], positions [B, L], validity mask [B, L]).

    Positions count real tokens only (HF's convention), so a padded row sees the positions it would alone."""
    length = length or max(map(len, prompts))
    pad = [length - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)], dtype=torch.long)
    valid = torch.tensor([[False] * n + [True] * len(p) for n, p in zip(pad, prompts)])
    return ids, (valid.long().cumsum(-1) - 1).clamp(min=0), valid


def _generate(ex, state, batches, seqs, ids, pos, valid, max_new, stop_check, progress) -> None:
    want_prompt_lp = any(s.params.prompt_logprobs is not None for s in seqs)
    padded = any(not v.all() for v in valid)
    logits = ex.forward(state, ids, pos, [v if padded else None for v in valid], all_logits=want_prompt_lp)
    if want_prompt_lp:
        for b, lg, v in zip(batches, logits, valid):
            _prompt_logprobs(b, lg, v)
        logits = [lg[:, -1] for lg in logits]
    step = 0
    while True:
        new_ids = []
        for b, lg in zip(batches, logits):
            _sample_into(b, lg)
            new_ids.append(torch.tensor([[s.out_ids[-1] if s.out_ids else 0] for s in b], dtype=torch.long))
        for s in seqs:
            if not s.done:
                _check_finish(s, stop_check)
        step += 1
        if progress is not None:
            progress(1)
        if all(s.done for s in seqs) or step >= max_new:
            break
        pos = [p[:, -1:] + 1 for p in pos]
        valid = [torch.cat([v, torch.ones(v.shape[0], 1, dtype=torch.bool)], 1) for v in valid]
        logits = ex.forward(state, new_ids, pos, [v if padded else None for v in valid])


def _sample_into(batch: list[Sequence], logits: torch.Tensor) -> None:
    nlp = max((s.params.logprobs for s in batch if s.params.logprobs is not None), default=None)
    res = sample(logits, [s.params for s in batch], [s.generator for s in batch], nlp)
    for r, s in enumerate(batch):
        if s.done:
            continue
        tok = res.token_ids[r]
        s.out_ids.append(tok)
        if s.params.logprobs is not None:
            s.logprobs.append(logprob_entry(res, r, s.params.logprobs))
            s.cum_logprob += res.logprobs[r]


def _check_finish(s: Sequence, stop_check) -> None:
    tok = s.out_ids[-1]
    if tok in s.stop_ids:
        s.finish_reason, s.stop_reason = "stop", tok
        return
    if stop_check is not None and stop_check(s):
        s.finish_reason = "stop"
        return
    if len(s.out_ids) >= s.params.max_tokens:
        s.finish_reason = "length"


def _prompt_logprobs(batch: list[Sequence], logits: torch.Tensor, valid: torch.Tensor) -> None:
    lp = logits.float().log_softmax(-1)  # [b, S, V]
    for r, s in enumerate(batch):
        if s.params.prompt_logprobs is None:
            continue
        n = len(s.prompt_ids)
        off = logits.shape[1] - n
        target = torch.tensor(s.prompt_ids[1:], device=lp.device)
        rows = lp[r, off:off + n - 1]
        chosen = rows.gather(1, target[:, None])[:, 0].tolist()
        out: list[dict[int, float] | None] = [None]
        k = s.params.prompt_logprobs
        tops = rows.topk(k, dim=-1) if k > 0 else None
        for i, t in enumerate(s.prompt_ids[1:]):
            entry = {t: chosen[i]}
            if tops is not None:
                entry.update(dict(zip(tops.indices[i].tolist(), tops.values[i].tolist())))
            out.append(entry)
        s.prompt_logprobs = out

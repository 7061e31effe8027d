"""Perplexity of a text file with a sliding window (the Hugging Face recipe: each token is scored once, with
up to `window - stride` tokens of context carried over from the previous window)."""
from __future__ import annotations

import math
import os

import torch

from ..errors import RequestError


def token_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one prefill over the executor (as prompt log-probabilities are
    computed)."""
    from ..engine.block import prompt_logits
    from ..engine.generation import position_logprobs

    _, chosen = position_logprobs(prompt_logits(llm.executor, ids), ids)
    return chosen.cpu()


def perplexity(model: str | None, path: str, dtype: str = "auto", device: str | None = None, window: int = 512,
               stride: int = 256, **quant) -> float:
    """`quant`: `LLM`'s quantization keywords (quantization, quant_group_size, kv_cache_dtype)."""
    from ..engine.llm import LLM

    if not os.path.isfile(path):
        raise RequestError(f"text file {path!r} does not exist")
    if not 0 < stride <= window:
        raise RequestError(f"need 0 < stride <= window, got stride {stride} and window {window}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    llm = LLM(model, dtype=dtype, device=device, **quant)
    try:
        ids = llm.tokenizer.encode(text)
        window = min(window, llm.config.max_position)
        if len(ids) < 2:
            raise RequestError("the text has fewer than two tokens")
        nll, count, prev_end = 0.0, 0, 1
        from tqdm import tqdm

        starts = list(range(0, max(len(ids) - 1, 1), stride))
        for begin in tqdm(starts, desc="perplexity", unit="window", leave=False):
            end = min(begin + window, len(ids))
            lp = token_logprobs(llm, ids[begin:end])  # scores of positions begin+1 .. end-1
            first_new = max(prev_end, begin + 1)
            scored = lp[first_new - begin - 1:]
            nll -= float(scored.double().sum())
            count += scored.numel()
            prev_end = end
            if end == len(ids):
                break
        return math.exp(nll / count)
    finally:
        llm.close()

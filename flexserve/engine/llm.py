"""`LLM`: the offline front end. Prompts in, `RequestOutput`s out, under any placement `Policy`."""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch

from ..errors import PolicyError, RequestError
from ..models.loading import open_model
from ..models.loading import resolve_device, resolve_dtype  # noqa: F401  (scripts import them from here)
from ..offload.budget import check_fits
from ..offload.executor import OffloadExecutor
from ..offload.policy import Policy
from ..tokenizer import Tokenizer
from .block import run_block
from .config import EngineConfig
from .detokenize import IncrementalText, find_stop
from .generation import Sequence
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams, fit_prompt, make_generator, stop_token_ids
from .windowed import WindowedGenerator, WindowedRequest

DEFAULT_MAX_BATCH = 64


class LLM:
    """A model loaded under a placement policy, ready to generate.

    `model`: a Hugging Face folder, a `.gguf` file, `dummy:PRESET`, or None for the default SmolLM2 model.
    `policy`: where weights/cache/activations live and the block shape; None means fully resident, with
    every prompt of a `generate` call in one batch (up to 64 at a time).
    `gpu_limit` / `cpu_limit`: byte caps on top of what is free (to mimic a smaller machine); a policy that
    does not fit raises `PolicyError` before anything is allocated.
    `sliding_window` / `attention_sinks`: StreamingLLM (each query sees the first `attention_sinks` tokens and
    its last `sliding_window` ones), so generation can run past the context window with a bounded cache; the
    prompts then run through the paged serving engine (see `windowed.py`).
    `quantization` (fp8 | int8 | rtn4 | awq), `quant_group_size`, `kv_cache_dtype` ("fp8"): the `Policy` fields
    of the same names, applied on top of `policy`.
    """

    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto", policy: Policy | None = None,
                 offload_dir: str | None = None, device: str | torch.device | None = None, seed: int = 0,
                 progress: bool = False, gpu_limit: int | None = None, cpu_limit: int | None = None,
                 sliding_window: int = 0, attention_sinks: int = 0, quantization: str | None = None,
                 quant_group_size: int | None = None, kv_cache_dtype: str | None = None):
        # What places and runs the model, and what the memory checks count (an fp8 cache is half the bytes).
        # `self.policy` stays None without a policy of the caller's: each `generate` then sizes its own batch.
        placed = Policy.with_quantization(policy, quantization=quantization, quant_group_size=quant_group_size,
                                          kv_cache_dtype=kv_cache_dtype)
        policy = placed if policy is not None else None
        self._windowed: WindowedGenerator | None = None
        self._seed = seed
        self._ids = itertools.count()
        if sliding_window or attention_sinks:
            self._windowed = WindowedGenerator(EngineConfig(
                model=model, dtype=dtype, device=None if device is None else str(device), scheduler="fcfs",
                policy=placed, offload_dir=offload_dir, seed=seed, sliding_window=sliding_window,
                attention_sinks=attention_sinks))
            engine = self._windowed.engine
            self.model, self.device, self.dtype, self.config = (engine.model_path, engine.device, engine.dtype,
                                                                engine.model_config)
            self.policy, self.tokenizer, self.executor = policy, engine.tokenizer, None
            return
        opened = open_model(model, dtype, device)
        self.model, self.device, self.dtype, self.config = opened.path, opened.device, opened.dtype, opened.config
        self.policy = policy
        if policy is not None and policy.uses_disk and not offload_dir:
            raise PolicyError("the policy puts weights, cache or activations on disk: give offload_dir (a folder "
                              "for the disk tier)")
        self.gpu_limit, self.cpu_limit = gpu_limit, cpu_limit
        check_fits(self.config, placed or Policy(gpu_batch_size=1), self._dtype_bytes(), 1, self.device,
                   gpu_limit, cpu_limit)
        self.executor = OffloadExecutor(opened.source, placed or Policy(), self.device, self.dtype,
                                        offload_dir, progress)
        try:
            self.tokenizer = Tokenizer(self.model, self.config.vocab_size)
        except BaseException:
            self.executor.close()
            raise

    def _dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # --- prompts -----------------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            return prompt.get("prompt"), ids
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise RequestError(f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    def check_prompt(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        """Reject prompts that cannot run; returns the params with max_tokens clipped to the context (not with
        a sliding window, whose cache stays bounded)."""
        return fit_prompt(self.config, ids, params, unbounded=self._windowed is not None)

    def _stop_check(self, seq: Sequence) -> bool:
        """Did the newest token complete a stop string? (Incremental: only the text's tail is searched.)"""
        if not seq.params.stop:
            return False
        if seq.detok is None:
            seq.detok = IncrementalText(self.tokenizer)
        delta = seq.detok.add(seq.out_ids[-1])
        at = find_stop(seq.detok.text, len(delta), seq.params.stop)
        if at is None:
            return False
        seq.stop_reason = next(s for s in seq.params.stop if seq.detok.text.startswith(s, at))
        return True

    # --- generation --------------------------------------------------------------------------------------------
    def generate(self, prompts: str | dict | Iterable[str | dict], sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; prompts of different lengths are batched together (left-padded)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError("give one SamplingParams, or one per prompt")
        params_list = [p if p is not None else SamplingParams() for p in params_list]
        if self._windowed is not None:
            reqs = [WindowedRequest(text, ids, self.check_prompt(ids, params))
                    for (text, ids), params in ((self._prompt_ids(p), q) for p, q in zip(prompts, params_list))]
            return self._windowed.generate(reqs, self._ids)
        fallback = torch.Generator().manual_seed(self._seed)
        requests, seqs = [], []
        for prompt, params in zip(prompts, params_list):
            text, ids = self._prompt_ids(prompt)
            eff = self.check_prompt(ids, params)
            mine = []
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                mine.append(Sequence(ids, eff, make_generator(seed, fallback), stop_token_ids(self.config, params)))
            requests.append((text, ids, mine))
            seqs.extend(mine)
        self._run(seqs, use_tqdm)
        return [self._output(text, ids, mine) for text, ids, mine in requests]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to OpenAI-style messages and generate."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.tokenizer.chat_prompt(c)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        policy = self.policy or self.executor.policy.replace(gpu_batch_size=min(len(seqs), DEFAULT_MAX_BATCH))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].prompt_ids))  # less padding per block
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(s.params.max_tokens for s in seqs), desc="generating", unit="tok")
        step = policy.block_size
        for lo in range(0, len(order), step):
            block = [seqs[i] for i in order[lo:lo + step]]
            seq_len = max(len(s.prompt_ids) for s in block) + max(s.params.max_tokens for s in block)
            check_fits(self.config, policy, self._dtype_bytes(), seq_len, self.device, self.gpu_limit,
                       self.cpu_limit, weights_placed=True)
            run_block(self.executor, block, policy.gpu_batch_size, self._stop_check,
                      (lambda n, b=len(block): bar.update(b if n else 0)) if bar is not None else None)
        if bar is not None:
            bar.close()

    def _output(self, text: str | None, ids: list[int], seqs: list[Sequence]) -> RequestOutput:
        outs = []
        for i, s in enumerate(seqs):
            out_text = self.tokenizer.decode(s.out_ids)
            if isinstance(s.stop_reason, str):
                out_text = out_text[:out_text.index(s.stop_reason)]
            want_lp = s.params.logprobs is not None
            outs.append(CompletionOutput(i, out_text, list(s.out_ids), s.cum_logprob if want_lp else None,
                                         s.logprobs if want_lp else None, s.finish_reason, s.stop_reason))
        return RequestOutput(str(next(self._ids)), text, ids, outs, seqs[0].prompt_logprobs)

    def close(self) -> None:
        if self._windowed is not None:
            self._windowed.close()
        else:
            self.executor.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

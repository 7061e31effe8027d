"""`flexserve generate`: text for one or more prompts, on one device or (with -tp/-pp) under torchrun."""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import PolicyError, RequestError
from .common import add_model_arguments, add_policy_arguments, policy_for_model
from .parallel import add_parallel_arguments


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_arguments(g)
    add_policy_arguments(g)
    g.add_argument("prompt", nargs="+", help="one or more prompts (each is one chat message unless --raw)")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per completion")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0: greedy decoding; the server's default is 1, as "
                        "OpenAI's)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    g.add_argument("--stop", action="append", default=None, help="stop at this string (repeatable)")
    g.add_argument("-n", type=int, default=1, help="completions per prompt")
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument("--num-prompts", type=int, default=1, help="repeat the prompts (batched), e.g. to measure speed")
    add_parallel_arguments(g)
    g.set_defaults(func=cmd_generate)


def sampling_params(args: argparse.Namespace):
    """`SamplingParams` from the flags; an out-of-range value is an error naming its flag."""
    from ..engine import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=args.stop, n=args.n)
    except RequestError as e:
        field = str(e).split()[0]
        raise RequestError(f"{'-n' if field == 'n' else '--' + field.replace('_', '-')}: {e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise RequestError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.tensor_parallel > 1 or args.pipeline_parallel > 1:  # under torchrun: see docs/PARALLEL.md
        from .parallel import run_parallel_generate

        return run_parallel_generate(args)
    params = sampling_params(args)
    policy = policy_for_model(args, args.model, gen_len=args.max_tokens)
    if policy is not None and policy.uses_disk and not args.offload_dir:
        raise PolicyError("the placement puts weights, cache or activations on disk: give a folder for them "
                          "with --offload-dir DIR")
    from ..engine import LLM
    from ..weights import resolve_model

    model = resolve_model(args.model)  # a missing model or an uncached hub id fails here, in one line
    print(f"flexserve: loading {args.model or os.path.basename(model)} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, policy=policy, offload_dir=args.offload_dir, device=args.device)
    print(f"flexserve: model loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    try:
        dummy = (args.model or "").startswith("dummy:")
        if dummy:
            print("flexserve: note: a dummy model has random weights and no tokenizer: its output below is the "
                  "generated token ids", file=sys.stderr, flush=True)
        prompts = args.prompt * args.num_prompts
        if args.raw:
            outs = llm.generate(prompts, params)
        else:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        for i, out in enumerate(outs[: len(args.prompt)]):
            for j, c in enumerate(out.outputs):
                if len(args.prompt) > 1 or args.n > 1:
                    prompt = f"prompt {i + 1}, " if len(args.prompt) > 1 else ""
                    print(f"{'' if i == j == 0 else chr(10)}--- {prompt}completion {j + 1} ---")
                print(" ".join(map(str, c.token_ids)) if dummy else c.text.strip())
    finally:
        llm.close()
    return 0

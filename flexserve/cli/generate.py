"""`flexserve generate`: text for one or more prompts, on one device or (with -tp/-pp) under torchrun."""
from __future__ import annotations

import argparse

from .common import add_model_arguments, add_policy_arguments, policy_for_model
from .parallel import add_parallel_arguments


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_arguments(g)
    add_policy_arguments(g)
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("-n", type=int, default=1)
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument("--num-prompts", type=int, default=1, help="repeat the prompts (batched), e.g. to measure speed")
    add_parallel_arguments(g)
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.tensor_parallel > 1 or args.pipeline_parallel > 1:  # under torchrun: see docs/PARALLEL.md
        from .parallel import run_parallel_generate

        return run_parallel_generate(args)
    from ..engine import LLM, SamplingParams

    policy = policy_for_model(args, args.model, gen_len=args.max_tokens)
    llm = LLM(args.model, dtype=args.dtype, policy=policy, offload_dir=args.offload_dir, device=args.device)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop, n=args.n)
        prompts = args.prompt * args.num_prompts
        if args.raw:
            outs = llm.generate(prompts, params)
        else:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        for out in outs[: len(args.prompt)]:
            for c in out.outputs:
                print(c.text.strip())
    finally:
        llm.close()
    return 0

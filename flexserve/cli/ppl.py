"""`flexserve ppl`: perplexity of a text file with a sliding window."""
from __future__ import annotations

import argparse

from .common import add_model_arguments, add_quant_arguments, quant_fields


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppl", help="perplexity of a text file (sliding window)")
    add_model_arguments(p)
    add_quant_arguments(p)
    p.add_argument("file", help="text file to score")
    p.add_argument("--window", type=int, default=512, help="tokens each forward pass sees")
    p.add_argument("--stride", type=int, default=256, help="tokens the window moves by")
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args: argparse.Namespace) -> int:
    from ..benchmarks.perplexity import perplexity
    from ..errors import RequestError

    if args.window < 2:
        raise RequestError(f"--window must be >= 2 tokens, got {args.window}")
    if not 0 < args.stride <= args.window:
        raise RequestError(f"--stride must be within 1..--window ({args.window}), got {args.stride}")

    ppl = perplexity(args.model, args.file, dtype=args.dtype, device=args.device, window=args.window,
                     stride=args.stride, **quant_fields(args))
    print(f"perplexity: {ppl:.4f}")
    return 0

"""`flexserve ppl`: perplexity of a text file with a sliding window."""
from __future__ import annotations

import argparse

from .common import add_model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppl", help="perplexity of a text file (sliding window)")
    add_model_arguments(p)
    p.add_argument("file")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args: argparse.Namespace) -> int:
    from ..benchmarks.perplexity import perplexity

    ppl = perplexity(args.model, args.file, dtype=args.dtype, device=args.device, window=args.window,
                     stride=args.stride)
    print(f"perplexity: {ppl:.4f}")
    return 0

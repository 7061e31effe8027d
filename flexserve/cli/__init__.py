"""`flexserve generate | serve | plan | calibrate | ppl | bench`.

Every command-line flag of the project lives here. The library below takes typed settings (`EngineConfig`,
`Policy`, `ServerOptions`, the benchmark settings); this package alone reads flags and turns them into those,
so nothing outside it imports it. Each verb lives in its own module and mounts itself with
`register(subparsers)`; engines, servers and benchmarks are imported only when a verb runs.

Every verb turns a `FlexServeError` into one clear line on stderr and exit status 1: users should never see a
traceback for a mistake of theirs (a missing model, a bad policy, a prompt too long).
"""
from __future__ import annotations

import argparse
import sys

from ..errors import FlexServeError
from . import bench, generate, plan, ppl, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in (generate, ppl, serve, bench, plan):
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlexServeError as e:
        print(f"flexserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flexserve: interrupted", file=sys.stderr)
        return 130

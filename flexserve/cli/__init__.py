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


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with every option's default shown (unless its help already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default == argparse.SUPPRESS
                or isinstance(action, argparse._VersionAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})".strip()


class Parser(argparse.ArgumentParser):
    """Every verb's parser shows its defaults in --help."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def format_help(self) -> str:
        for action in self._actions:  # an option without help text still shows its default
            if action.help is None and action.option_strings and action.default is not None \
                    and action.default is not False:
                action.help = "(default: %(default)s)"
        return super().format_help()


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("flexserve")
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"flexserve {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flexserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    for verb in (generate, ppl, serve, bench, plan):
        verb.register(sub)
    return parser


# Placement flags whose value the verbs read with a fallback (`or 1`), checked here so that 0 is refused.
POSITIVE_FLAGS = ("gpu_batch_size", "num_gpu_batches")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values that would otherwise be replaced by a default before any typed config sees them."""
    from ..errors import PolicyError

    for name in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise PolicyError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        return args.func(args)
    except FlexServeError as e:
        print(f"flexserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flexserve: interrupted", file=sys.stderr)
        return 130

"""`pagoda` command: serve | generate | chat | bench. Each subcommand lives in its own module,
imported lazily so `pagoda --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, which exposes register(subparsers) -> adds its subcommand(s) with set_defaults(func=...))
SUBCOMMANDS = [
    "pagoda.entrypoints.cli.serve",         # serve
    "pagoda.entrypoints.cli.offline",       # generate, chat
    "pagoda.bench.cli",                     # bench throughput | latency | serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: LLM inference and serving engine")
    from pagoda import __version__
    parser.add_argument("--version", action="version", version=f"pagoda {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,chat,bench}")
    for mod in SUBCOMMANDS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # subcommand not built yet
                continue
            raise
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # bad flag values: one clear line, no traceback
        print(f"pagoda {args.command}: error: {e}", file=sys.stderr)
        return 2


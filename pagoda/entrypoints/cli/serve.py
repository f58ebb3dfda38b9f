"""`pagoda serve`: the subcommand; its flags are in entrypoints/openai/cli_args.py and the server
in entrypoints/openai/api_server.py (imported only when serving: torch loads with it)."""
from __future__ import annotations

import argparse

from pagoda.entrypoints.openai.cli_args import HelpFormatter, add_serve_args, resolve_args


def run_serve(args: argparse.Namespace) -> int:
    from pagoda.entrypoints.openai.api_server import run_server
    return run_server(resolve_args(args))


def register(subparsers) -> None:
    """Adds ``pagoda serve`` to the ``pagoda`` command."""
    parser = subparsers.add_parser(
        "serve", help="Serve a model over an OpenAI-compatible HTTP API.", formatter_class=HelpFormatter,
        description="Serve a model over an OpenAI-compatible HTTP API (flags as vLLM's `vllm serve`; "
                    "every flag can also be set by a PAGODA_<FLAG> environment variable).")
    add_serve_args(parser)
    parser.set_defaults(func=run_serve)

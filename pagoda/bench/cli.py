"""`pagoda bench throughput | latency | serve`. Importing this stays light (no torch): the heavy
modules load only when a benchmark actually runs."""
from __future__ import annotations

import argparse

_HELP = {
    "throughput": "Offline throughput in this process, against transformers baselines (--backend).",
    "latency": "Prefill and per-token decode time over a batch-size x input-length sweep.",
    "serve": "Online load (Poisson arrivals, streaming) against any OpenAI-compatible server.",
}


def _run(name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib
        return importlib.import_module(f"pagoda.bench.{name}").run(args)
    return run


def register(subparsers) -> None:
    from pagoda.bench import latency, serve, throughput
    bench = subparsers.add_parser("bench", help="Benchmark pagoda (and its peers).",
                                  description="Benchmark pagoda and its peers the same way.")
    sub = bench.add_subparsers(dest="bench_command", metavar="{throughput,latency,serve}")
    for name, mod in (("throughput", throughput), ("latency", latency), ("serve", serve)):
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        mod.add_cli_args(p)
        p.set_defaults(func=_run(name))
    bench.set_defaults(func=lambda args: bench.print_help() or 2)

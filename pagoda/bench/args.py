"""Flags shared by the offline benchmarks (throughput, latency): the engine flags, defined once in
pagoda.config, plus the model shape, the backends to compare and the output files."""
from __future__ import annotations

import argparse

BACKENDS = ("pagoda", "hf", "hf-cb")
BASELINES = ("hf", "hf-cb")
# engine flags whose names the benchmarks use for their own (LMDeploy's --backend: here, the
# backends to compare)
ENGINE_FLAGS_REPLACED = ("backend",)


def parse_backends(s: str) -> list[str]:
    names = [b.strip() for b in s.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {', '.join(bad) if bad else repr(s)}; choose from "
                                         f"{', '.join(BACKENDS)} (comma-separated)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"backend listed twice in {s!r}")
    return names


def add_common_args(p: argparse.ArgumentParser):
    """Adds the shared flags; returns the "Benchmark" group for the caller's own flags."""
    from pagoda.bench.shapes import SHAPES
    from pagoda.config import EngineArgs
    EngineArgs.add_cli_args(p, skip=ENGINE_FLAGS_REPLACED)
    g = p.add_argument_group("Benchmark")
    g.add_argument("--model-shape", default=None, choices=tuple(SHAPES),
                   help="Random-weight model of a standard shape instead of --model (no download).")
    g.add_argument("--backend", type=parse_backends, default=["pagoda"],
                   help="Comma-separated: pagoda, hf (transformers generate), hf-cb (transformers "
                   "generate_batch). Ratios are against the first baseline listed.")
    g.add_argument("--output-json", default=None, help="Write the results here.")
    g.add_argument("--plot", default=None, help="Write a PNG chart of the results here.")
    g.add_argument("--disable-tqdm", action="store_true", help="No progress bars.")
    return g

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


# name on the command line -> SamplingParams field; defaults are greedy (as W1)
SAMPLING_FLAGS = {"temperature": (float, 0.0), "top_p": (float, 1.0), "top_k": (int, 0),
                  "min_p": (float, 0.0), "repetition_penalty": (float, 1.0),
                  "presence_penalty": (float, 0.0), "frequency_penalty": (float, 0.0),
                  "logprobs": (int, None)}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling settings of every pagoda request (default greedy, as W1): the W1-sampled and
    W1-penalties variants are `--temperature 0.8 --top-p 0.95 [--top-k 50 --repetition-penalty 1.1]`."""
    g = p.add_argument_group("Sampling (pagoda backend)")
    for name, (typ, default) in SAMPLING_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=default,
                       help=f"SamplingParams.{name} of every request (default {default}).")


def sampling_settings(args) -> dict:
    """The sampling flags that differ from greedy, as SamplingParams keywords."""
    return {k: getattr(args, k) for k, (_, d) in SAMPLING_FLAGS.items() if getattr(args, k) != d}


def sampling_params(settings: dict, max_tokens: int):
    """SamplingParams of one benchmark request; a bad value names its flag."""
    from pagoda.sampling_params import SamplingParams
    try:
        return SamplingParams(**{"temperature": 0.0, **settings}, max_tokens=max_tokens, ignore_eos=True)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise ValueError(f"--{name.replace('_', '-')}: {str(e).split(' ', 1)[1]}") from None

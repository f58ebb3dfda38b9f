"""Sampling settings against greedy through `pagoda serve` (issue 11's figure as users get it).

    python benchmarks/sampling_served.py [--rounds 3] [-- extra `pagoda serve` flags]

Starts `pagoda serve` (the bundled model unless --model is given), then runs `pagoda bench serve`
on the chat endpoint (8 synthetic chat prompts, 128 tokens each, EOS ignored, all in flight) for
greedy, temperature 0.8 + top_p 0.95, + top_k 50 + repetition_penalty 1.1, and greedy with
logprobs (top 5) — the settings of benchmarks/w1_sampling_vs_greedy.py — interleaved for
--rounds rounds; prints each setting's median output tok/s and its ratio to greedy, and exits 1
if a request failed or a token is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from w1_sampling_vs_greedy import SETTINGS  # noqa: E402


def request_fields(setting: dict) -> tuple[float, dict]:
    """(temperature, the other fields of a chat request) for one of SETTINGS."""
    extra = {k: v for k, v in setting.items() if k not in ("temperature", "logprobs")}
    if "logprobs" in setting:  # chat's spelling of logprobs=5
        extra.update(logprobs=True, top_logprobs=setting["logprobs"])
    return setting.get("temperature", 0.0), extra


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="model for `pagoda serve` (default: the bundled one)")
    p.add_argument("--output-json", default=None)
    args, serve_flags = p.parse_known_args()
    from pagoda.bench.server_process import ServerProcess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    work = tempfile.mkdtemp(prefix="sampling-served-")
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *([args.model] if args.model else []),
           "--port", str(port), "--disable-log-requests", *serve_flags]
    runs: dict[str, list[dict]] = {name: [] for name, _ in SETTINGS}
    with ServerProcess(cmd, url, os.path.join(work, "serve.log"), cwd=ROOT):
        for rnd in range(args.rounds + 1):  # round 0 warms every setting up, untimed
            for name, setting in SETTINGS:
                temperature, extra = request_fields(setting)
                out = os.path.join(work, f"r{rnd}_{len(runs[name])}.json")
                r = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "bench", "serve",
                                    "--base-url", url, "--endpoint", "/v1/chat/completions",
                                    "--workload", "synthetic-chat",
                                    "--num-prompts", str(args.num_prompts if rnd else 2),
                                    "--max-tokens", str(args.max_tokens if rnd else 8), "--ignore-eos",
                                    "--temperature", str(temperature), "--extra-body", json.dumps(extra),
                                    "--disable-tqdm", "--output-json", out],
                                   cwd=ROOT, stdout=subprocess.DEVNULL)
                if r.returncode:
                    print(f"{name}: bench serve failed (exit {r.returncode})", file=sys.stderr)
                    return 1
                if rnd:
                    with open(out) as f:
                        summary = json.load(f)["summary"]
                    runs[name].append(summary)
                    print(f"round {rnd} {name}: {summary['output_throughput']:.1f} out tok/s", flush=True)
    expected = args.num_prompts * args.max_tokens
    ok = all(s["errors"] == 0 and s["output_tokens"] == expected for v in runs.values() for s in v)
    med = {name: statistics.median(s["output_throughput"] for s in v) for name, v in runs.items()}
    greedy = med[SETTINGS[0][0]]
    print(f"\nthrough pagoda serve, {args.num_prompts} chat prompts x {args.max_tokens} tokens, "
          f"median of {args.rounds} interleaved rounds; errors 0 and all tokens: {ok}")
    for name, v in med.items():
        print(f"  {name:50s} {v:9.1f} out tok/s  {v / greedy:.2f}x greedy")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"median": med, "vs_greedy": {k: v / greedy for k, v in med.items()},
                       "runs": runs, "serve_flags": serve_flags, "ok": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

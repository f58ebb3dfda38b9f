"""W1 offline and W1-HTTP through `pagoda serve`, in one run, on the same random-weight model.

    python benchmarks/w1_http_vs_offline.py --model-shape qwen3-0.6b [--engine-core process]

1. offline: `pagoda bench throughput --backend pagoda` on W1's 512 token-id prompts;
2. served: `pagoda serve <shape> --load-format dummy --skip-tokenizer-init`, then
   `pagoda bench serve --workload w1` sends the same prompts at once to /v1/completions
   (streamed, include_usage, ignore_eos, max_tokens 256, greedy, return_token_ids).
Prints both figures, their ratio, TTFT/ITL percentiles, the longest gap between two chunks of
one stream, errors and tokens counted; exits 1 if a request failed or a token is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def pagoda(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", *args], cwd=ROOT, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len-range", type=int, nargs=2, default=(128, 1024))
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out", default=None, help="JSON with both runs' summaries")
    p.add_argument("--serve-timeout", type=float, default=600)
    args, serve_flags = p.parse_known_args()  # anything else goes to `pagoda serve`
    work = tempfile.mkdtemp(prefix="w1-http-")
    common = ["--num-prompts", str(args.num_prompts), "--seed", "0"]
    lo, hi = map(str, args.input_len_range)

    offline_json = os.path.join(work, "offline.json")
    r = pagoda("bench", "throughput", "--model-shape", args.model_shape, "--backend", "pagoda",
               "--input-len-range", lo, hi, "--output-len", str(args.output_len),
               "--max-model-len", str(args.max_model_len), "--output-json", offline_json, *common)
    if r.returncode:
        return r.returncode
    with open(offline_json) as f:
        offline = json.load(f)
    off = next(b for b in offline["results"] if b["backend"] == "pagoda")

    from pagoda.bench.shapes import cleanup_model_dir, write_model_dir
    model_dir = write_model_dir(args.model_shape)
    port = free_port()
    log = open(os.path.join(work, "serve.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", model_dir,
                               "--load-format", "dummy", "--skip-tokenizer-init", "--port", str(port),
                               "--max-model-len", str(args.max_model_len), "--disable-log-requests",
                               *serve_flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx
        deadline = time.time() + args.serve_timeout
        while True:
            if server.poll() is not None:
                print(open(log.name).read()[-3000:])
                return 1
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("pagoda serve did not become healthy")
            time.sleep(0.5)
        served_json = os.path.join(work, "served.json")
        r = pagoda("bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--workload", "w1",
                   "--model-shape", args.model_shape, "--input-len-range", lo, hi,
                   "--max-tokens", str(args.output_len), "--ignore-eos", "--disable-tqdm",
                   "--output-json", served_json, *common)
        if r.returncode:
            return r.returncode
        with open(served_json) as f:
            served = json.load(f)["summary"]
    finally:
        server.terminate()
        server.wait(60)
        cleanup_model_dir(model_dir)
    expected = args.num_prompts * args.output_len
    off_tps = off["output_tok_per_s"]
    ratio = served["output_throughput"] / off_tps
    lines = [
        f"W1 {args.model_shape}: offline {off_tps:,.0f} out tok/s; through pagoda serve "
        f"{served['output_throughput']:,.0f} out tok/s; ratio {ratio:.3f}",
        f"served: {served['output_tokens']}/{expected} tokens, {served['errors']} errors; "
        f"TTFT p50 {served['ttft_ms']['p50']:.0f} ms p99 {served['ttft_ms']['p99']:.0f} ms; "
        f"ITL p50 {served['itl_ms']['p50']:.1f} ms p99 {served['itl_ms']['p99']:.1f} ms; "
        f"longest gap between two chunks of a stream {served['max_gap_ms']:.0f} ms",
        f"serve flags: {' '.join(serve_flags) or '(defaults)'}",
    ]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.model_shape, "offline": off, "served": served, "ratio": ratio,
                       "serve_flags": serve_flags, "summary": lines}, f, indent=1)
    return 0 if served["errors"] == 0 and served["output_tokens"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())

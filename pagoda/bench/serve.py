"""`pagoda bench serve`: online load against any OpenAI-compatible server.

Requests arrive as a Poisson process (or all at once), optionally capped by a concurrency limit,
and always stream, so the time to the first token and the gaps between tokens are seen as a
client sees them. Works the same against pagoda, vLLM or llama.cpp's server: nothing here knows
which one answers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RequestRecord:
    """What one request looked like from the client. Times in ms; *_s are seconds since start."""
    index: int
    start_s: float
    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None  # (e2e - ttft) / (output_tokens - 1); None for 1-token outputs
    e2e_ms: Optional[float] = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None  # from the server's usage, when it reports one
    tokens_from_usage: bool = False
    finish_reason: Optional[str] = None
    token_times_s: list[float] = field(default_factory=list)
    error: Optional[str] = None


@dataclass
class LoadConfig:
    base_url: str
    endpoint: str
    model: str
    max_tokens: int
    request_rate: float = math.inf
    max_concurrency: Optional[int] = None
    num_prompts: Optional[int] = None
    duration_s: Optional[float] = None
    temperature: float = 0.0
    ignore_eos: bool = False
    api_key: Optional[str] = None
    seed: int = 0
    request_timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)


def parse_rate(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of requests/s or 'inf', got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {s!r}")
    return v


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (a Poisson process), 0 at rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def build_payload(cfg: LoadConfig, prompt: "str | list[int]") -> dict:
    body: dict = {"model": cfg.model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if isinstance(prompt, list):  # token ids (W1-HTTP): count tokens by the ids each chunk carries
        body["prompt"] = prompt
        body["return_token_ids"] = True
    elif cfg.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra field; servers that do not know it ignore it
    body.update(cfg.extra_body)
    return body


def _chunk_text(obj: dict, chat: bool) -> str:
    parts = []
    for choice in obj.get("choices") or []:
        if choice.get("token_ids"):  # a server asked for token ids (return_token_ids) sends them
            parts.append("\0" * len(choice["token_ids"]))
        if chat:
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or "")
            parts.append(delta.get("reasoning_content") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


async def send_request(session, cfg: LoadConfig, index: int, prompt: str, t0: float) -> RequestRecord:
    """Stream one request and time every chunk that carries text."""
    import aiohttp
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    chat = cfg.endpoint == "/v1/chat/completions"
    start = time.perf_counter()
    rec = RequestRecord(index=index, start_s=start - t0)
    stamps: list[float] = []
    usage_tokens = None
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
        async with session.post(cfg.base_url + cfg.endpoint, json=build_payload(cfg, prompt),
                                headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                rec.error = f"HTTP {resp.status}: {body}"
                return rec
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    err = obj["error"]
                    rec.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return rec
                if _chunk_text(obj, chat):
                    stamps.append(time.perf_counter())
                for choice in obj.get("choices") or []:
                    rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
                usage = obj.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    rec.prompt_tokens = usage.get("prompt_tokens")
    except asyncio.TimeoutError:
        rec.error = f"timed out after {cfg.request_timeout_s:g} s"
        return rec
    except (aiohttp.ClientError, ValueError, OSError) as e:  # ValueError: bad JSON, overlong line
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    end = time.perf_counter()
    if not stamps:
        rec.error = "the stream carried no text"
        return rec
    if rec.finish_reason is None:  # e.g. cut off by the server for another request
        rec.error = f"the stream ended without a finish_reason after {len(stamps)} text chunks"
        return rec
    rec.tokens_from_usage = usage_tokens is not None
    rec.output_tokens = usage_tokens if usage_tokens is not None else len(stamps)
    rec.ttft_ms = (stamps[0] - start) * 1e3
    rec.e2e_ms = (end - start) * 1e3
    rec.itl_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    if rec.output_tokens > 1:
        rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (rec.output_tokens - 1)
    rec.token_times_s = [s - t0 for s in stamps]
    return rec


async def run_load(cfg: LoadConfig, prompts: list[str], progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Issue the prompts at Poisson times until they run out or --duration passes.

    Returns the records (in issue order) and the wall time from the first send to the last
    finish. Requests still queued behind --max-concurrency when the duration ends are not sent;
    those in flight finish (each is bounded by --request-timeout).
    """
    import aiohttp
    from tqdm import tqdm
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(total=len(prompts), disable=not progress, unit="req", desc="bench serve")
    connector = aiohttp.TCPConnector(limit=0)
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration_s if cfg.duration_s else math.inf
    last_end = t0

    async def one(i: int, prompt: str) -> Optional[RequestRecord]:
        nonlocal last_end
        if sem:
            await sem.acquire()
        try:
            if time.perf_counter() >= deadline:
                return None
            rec = await send_request(session, cfg, i, prompt, t0)
            last_end = max(last_end, time.perf_counter())
            bar.update(1)
            return rec
        finally:
            if sem:
                sem.release()

    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for i, (gap, prompt) in enumerate(zip(arrival_gaps(len(prompts), cfg.request_rate, cfg.seed), prompts)):
            if gap:
                await asyncio.sleep(gap)
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(i, prompt)))
        results = await asyncio.gather(*tasks)
    bar.close()
    records = [r for r in results if r is not None]
    return records, max(last_end - t0, 1e-9)


def summarize_run(records: list[RequestRecord], duration_s: float, slo_ttft_ms: Optional[float] = None,
                  slo_tpot_ms: Optional[float] = None) -> dict:
    from pagoda.bench.report import summarize
    ok = [r for r in records if r.error is None]
    out_tok = sum(r.output_tokens for r in ok)
    prompt_known = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    s = {
        "requests_sent": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "duration_s": duration_s,
        "output_tokens": out_tok,
        "prompt_tokens": sum(prompt_known) if len(prompt_known) == len(ok) else None,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tok / duration_s,
        "ttft_ms": summarize([r.ttft_ms for r in ok]),
        "tpot_ms": summarize([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "itl_ms": summarize([v for r in ok for v in r.itl_ms]),
        # the longest wait between two chunks of one stream (a stream starved while others ran)
        "max_gap_ms": max((v for r in ok for v in r.itl_ms), default=0.0),
        "e2e_ms": summarize([r.e2e_ms for r in ok]),
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [r for r in ok
                if (slo_ttft_ms is None or r.ttft_ms <= slo_ttft_ms)
                and (slo_tpot_ms is None or r.tpot_ms is None or r.tpot_ms <= slo_tpot_ms)]
        s["goodput_requests"] = len(good)
        s["goodput"] = len(good) / duration_s
    return s


def format_summary(summary: dict, title: str) -> str:
    from pagoda.bench.report import PERCENTILES, key_values, table
    pairs = [("Requests completed", summary["completed"]), ("Errors", summary["errors"]),
             ("Duration (s)", summary["duration_s"]), ("Output tokens", summary["output_tokens"]),
             ("Request throughput (req/s)", summary["request_throughput"]),
             ("Output token throughput (tok/s)", summary["output_throughput"])]
    if summary["prompt_tokens"] is not None:
        pairs.insert(4, ("Prompt tokens", summary["prompt_tokens"]))
    if "goodput" in summary:
        pairs.append(("Goodput (req/s within SLO)", summary["goodput"]))
    pairs.append(("Longest gap between two chunks of a stream (ms)", summary.get("max_gap_ms", 0.0)))
    rows = [[name] + [summary[key]["mean"]] + [summary[key][f"p{p}"] for p in PERCENTILES]
            for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))]
    return (key_values(pairs, title) + "\n\n"
            + table(["latency (ms)", "mean"] + [f"p{p}" for p in PERCENTILES], rows))


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="Server root (default http://127.0.0.1:8000; a trailing /v1 is accepted).")
    p.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS,
                   help="API to load (default /v1/completions).")
    p.add_argument("--model", default=None, help="Model name sent in requests (default: the first "
                   "one GET /v1/models lists).")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help="JSONL file, one {\"prompt\": ...} per line.")
    src.add_argument("--workload", default="synthetic-chat", choices=("synthetic-chat", "random", "w1"),
                     help="Built-in prompts (synthetic-chat, the default), random text of --input-len "
                     "words, or w1: W1's token-id prompts (lengths uniform in --input-len-range, ids "
                     "uniform in [100, --vocab-size - 100), seeded by --seed), sent as token ids on "
                     "/v1/completions with return_token_ids.")
    p.add_argument("--input-len-range", type=int, nargs=2, default=(128, 1024), metavar=("LO", "HI"),
                   help="w1: prompt lengths in tokens (default 128 1024).")
    p.add_argument("--vocab-size", type=int, default=None, help="w1: the model's vocabulary size "
                   "(default: --model-shape's).")
    p.add_argument("--model-shape", default=None, help="w1: the shape the server runs (qwen3-0.6b, "
                   "llama3-8b, tiny-llama), for its vocabulary size.")
    p.add_argument("--input-len", type=int, default=64, help="Words per random-text prompt (default 64).")
    p.add_argument("--num-prompts", type=int, default=100, help="Requests to send, at most (default 100).")
    p.add_argument("--duration", type=float, default=None,
                   help="Stop sending new requests after this many seconds.")
    p.add_argument("--request-rate", type=parse_rate, default=math.inf,
                   help="Mean arrivals per second (Poisson), or inf to send all at once (default).")
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight (default unlimited).")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128).")
    p.add_argument("--ignore-eos", action="store_true", help="Ask the server to generate max-tokens "
                   "tokens regardless of EOS (vLLM's ignore_eos field).")
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (default 0, greedy).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the arrival times and random prompts.")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body.")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="Goodput SLO on time to first token.")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="Goodput SLO on time per output token.")
    p.add_argument("--request-timeout", type=float, default=600.0, help="Seconds before one request "
                   "counts as an error (default 600).")
    p.add_argument("--label", default=None, help="Name of this run in the table, JSON and plot.")
    p.add_argument("--output-json", default=None, help="Write the summary and per-request records here.")
    p.add_argument("--plot", default=None, help="Write latency distributions and throughput over time "
                   "to this PNG.")
    p.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")


def _validate(args) -> None:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts: must be >= 1, got {args.num_prompts}")
    if args.duration is not None and not args.duration > 0:
        raise ValueError(f"--duration: must be > 0 seconds, got {args.duration}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be >= 1, got {args.max_concurrency}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    if args.input_len < 1:
        raise ValueError(f"--input-len: must be >= 1, got {args.input_len}")
    if args.workload == "w1" and args.endpoint != "/v1/completions":
        raise ValueError("--workload w1 sends token-id prompts: use --endpoint /v1/completions")
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout: must be > 0, got {args.request_timeout}")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url: expected http://HOST:PORT, got {args.base_url!r}")


def _first_model(base_url: str, api_key: Optional[str]) -> str:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url + "/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--model: not given, and GET {base_url}/v1/models did not name one ({e})") from None


def load_prompts(args) -> list[str]:
    from pagoda.bench import workloads
    if args.dataset:
        return workloads.load_jsonl_prompts(args.dataset, args.num_prompts)
    if args.workload == "random":
        return workloads.random_text_prompts(args.num_prompts, args.input_len, args.seed)
    if args.workload == "w1":
        vocab = args.vocab_size
        if vocab is None and args.model_shape:
            from pagoda.bench.shapes import SHAPES
            if args.model_shape not in SHAPES:
                raise ValueError(f"--model-shape: unknown shape {args.model_shape!r}; choose from "
                                 f"{', '.join(SHAPES)}")
            vocab = SHAPES[args.model_shape]["vocab_size"]
        if vocab is None:
            raise ValueError("--workload w1 needs --vocab-size or --model-shape")
        lo, hi = args.input_len_range
        return workloads.random_token_prompts(args.num_prompts, lo, hi, vocab, args.seed)
    return workloads.synthetic_chat_prompts(args.num_prompts)


def _run_async(coro):
    """The load generator on uvloop where installed (as the server runs): a client that parses
    tens of thousands of chunks a second must not be the slower side of the measurement."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(args) -> int:
    from pagoda.bench import report
    _validate(args)
    extra = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body: not valid JSON ({e.msg})") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body: must be a JSON object")
    base = args.base_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    model = args.model or _first_model(base, args.api_key)
    cfg = LoadConfig(base_url=base, endpoint=args.endpoint, model=model, max_tokens=args.max_tokens,
                     request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                     num_prompts=args.num_prompts, duration_s=args.duration,
                     temperature=args.temperature, ignore_eos=args.ignore_eos, api_key=args.api_key,
                     seed=args.seed, request_timeout_s=args.request_timeout, extra_body=extra)
    prompts = load_prompts(args)
    records, duration = _run_async(run_load(cfg, prompts, progress=not args.disable_tqdm))
    summary = summarize_run(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    label = args.label or f"{model} @ {base}"
    print(format_summary(summary, f"bench serve: {label} ({args.endpoint}, rate {args.request_rate:g}/s, "
                                  f"concurrency {args.max_concurrency or 'unlimited'})"))
    errors = [r.error for r in records if r.error]
    if errors:
        print(f"first error: {errors[0]}")
    config = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    result = {"label": label, "config": config, "summary": summary, "requests": [asdict(r) for r in records]}
    if args.output_json:
        report.write_json(args.output_json, result)
    if args.plot:
        report.plot_serve([result], args.plot)
    return 0

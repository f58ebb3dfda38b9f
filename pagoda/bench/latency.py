"""`pagoda bench latency`: how long one batch takes to prefill and then each decode step,
swept over batch sizes and prompt lengths.

pagoda runs behind its async engine with a step listener, so a decode step's time is the wall
gap between two engine steps (the whole loop: schedule, forward, sample, hand out). On CUDA the
floor beside it is the bytes a decode step must read (weights, plus the batch's KV cache at
mid-decode) over the measured copy bandwidth.
"""
from __future__ import annotations

import asyncio
import itertools
import time
import uuid

from pagoda.bench.args import add_common_args


def add_cli_args(p) -> None:
    g = add_common_args(p)
    g.add_argument("--batch-size", type=int, nargs="+", default=[1], help="Batch sizes to sweep (default 1).")
    g.add_argument("--input-len", type=int, nargs="+", default=[128], help="Prompt lengths to sweep (default 128).")
    g.add_argument("--output-len", type=int, default=64, help="Tokens generated per request (default 64).")
    g.add_argument("--num-iters", type=int, default=1, help="Repeats of each point, steps pooled (default 1).")


def copy_bandwidth(device: str) -> float:
    """Device memory bandwidth in bytes/s: 20 copies of a 1 GiB buffer (read + write each)."""
    import torch
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    a.random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize(device)
    bw = 20 * 2 * n / (start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return bw


class _PromptSource:
    """Fresh random prompts for every batch, so no batch hits another's prefix cache."""

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.seed = vocab, seed

    def batch(self, size: int, length: int) -> list[list[int]]:
        from pagoda.bench.workloads import random_token_prompts
        self.seed += 1
        return random_token_prompts(size, length, length, self.vocab, self.seed)


async def _pagoda_batch(engine, prompts, out_len, stamps) -> tuple[float, list[float], list[int]]:
    """One batch through the async engine: (prefill s, decode step s, tokens per request)."""
    from pagoda.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    tag = uuid.uuid4().hex[:8]
    stamps.clear()
    t0 = time.perf_counter()

    async def consume(i, ids):
        first, n = None, 0
        async for out in engine.generate(ids, params, f"bench-latency-{tag}-{i}"):
            n = len(out.outputs[0].token_ids)
            if first is None and n:
                first = time.perf_counter()
        return first, n

    res = await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))
    prefill_done = max(f for f, _ in res)
    # decode steps: the ones after the last step that still computed prompt tokens. (Judged by the
    # engine's own step stats, not by when the event loop saw the first token: under load that can
    # be after the next step has already run.)
    last_prefill = max((i for i, (_, st) in enumerate(stamps) if st.step_prompt_tokens > 0), default=0)
    steps = stamps[last_prefill:]
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:]) if b[1].step_prompt_tokens == 0]
    return prefill_done - t0, gaps, [n for _, n in res]


async def _pagoda_sweep(target, points, args, source, progress) -> list[dict]:
    from tqdm import tqdm
    from pagoda.config import EngineArgs
    from pagoda.engine.async_llm import AsyncLLM
    from pagoda.engine.core_client import engine_core_mode
    args_ = EngineArgs(**target.engine_kwargs)
    engine = AsyncLLM(args_, engine_core=engine_core_mode("auto", args_.device))
    stamps: list = []
    engine.add_step_listener(lambda st: stamps.append((time.perf_counter(), st)))
    results = []
    try:
        await _pagoda_batch(engine, source.batch(min(points[0][0], 4), points[0][1]), min(args.output_len, 4),
                            stamps)  # warm-up
        for b, L in tqdm(points, disable=not progress, desc="bench latency (pagoda)"):
            runs = [await _pagoda_batch(engine, source.batch(b, L), args.output_len, stamps)
                    for _ in range(args.num_iters)]
            results.append(_point("pagoda", b, L, args.output_len, runs))
    finally:
        await engine.shutdown()
    return results


def _hf_sweep(target, points, args, source, progress) -> list[dict]:
    from tqdm import tqdm
    from pagoda.bench import hf_backend
    model = hf_backend.load_model(target)
    results = []
    try:
        hf_backend.timed_steps(model, source.batch(1, points[0][1]), min(args.output_len, 4), target.device)
        for b, L in tqdm(points, disable=not progress, desc="bench latency (hf)"):
            runs = []
            for _ in range(args.num_iters):
                prefill, gaps, per_req = hf_backend.timed_steps(model, source.batch(b, L), args.output_len,
                                                                target.device)
                runs.append((prefill, gaps, [per_req] * b))
            results.append(_point("hf", b, L, args.output_len, runs))
    finally:
        hf_backend.release(model)
    return results


def _point(backend, b, L, out_len, runs) -> dict:
    from pagoda.bench.report import summarize
    decode_ms = [g * 1e3 for _, gaps, _ in runs for g in gaps]
    counted = sum(sum(c) for _, _, c in runs)
    expected = b * out_len * len(runs)
    return {"backend": backend, "batch_size": b, "input_len": L, "output_len": out_len,
            "prefill_ms": sum(p for p, _, _ in runs) / len(runs) * 1e3,
            "decode_ms": decode_ms, "decode": summarize(decode_ms),
            "output_tokens": counted, "expected_output_tokens": expected,
            "counts_ok": all(len(c) == b and all(n == out_len for n in c) for _, _, c in runs)}


def validate(args) -> None:
    for name, vals in (("batch-size", args.batch_size), ("input-len", args.input_len)):
        if any(v < 1 for v in vals):
            raise ValueError(f"--{name}: every value must be >= 1, got {vals}")
    if args.output_len < 2:
        raise ValueError(f"--output-len: must be >= 2 to time a decode step, got {args.output_len}")
    if args.num_iters < 1:
        raise ValueError(f"--num-iters: must be >= 1, got {args.num_iters}")
    if "hf-cb" in args.backend:
        raise ValueError("--backend: hf-cb has no per-step timing; use pagoda and/or hf")


def run(args) -> int:
    from pagoda.bench import model_target, report
    validate(args)
    target = model_target.from_args(args)
    progress = not args.disable_tqdm
    points = list(itertools.product(args.batch_size, args.input_len))
    try:
        source = _PromptSource(model_target.vocab_size(target), args.seed)
        bw = copy_bandwidth(target.device) if target.device.startswith("cuda") else None
        by_backend = {}
        # the baseline first: it frees its memory, pagoda's KV cache would not leave room for it
        for backend in sorted(args.backend, key=lambda b: b == "pagoda"):
            if backend == "pagoda":
                by_backend[backend] = asyncio.run(_pagoda_sweep(target, points, args, source, progress))
            else:
                by_backend[backend] = _hf_sweep(target, points, args, source, progress)
        results = [r for b in args.backend for r in by_backend[b]]
        if bw:
            wbytes, kv_tok = model_target.weight_bytes(target), model_target.kv_bytes_per_token(target)
            for r in results:
                ctx = r["input_len"] + r["output_len"] / 2
                r["floor_ms"] = (wbytes + kv_tok * ctx * r["batch_size"]) / bw * 1e3
    finally:
        model_target.cleanup(target)
    rows = [[r["backend"], r["batch_size"], r["input_len"], r["output_len"], r["prefill_ms"],
             r["decode"]["mean"], r["decode"]["p50"], r["decode"]["p90"], r["decode"]["p99"],
             r.get("floor_ms"), r["batch_size"] * 1e3 / r["decode"]["mean"] if r["decode_ms"] else None,
             f"{r['output_tokens']}/{r['expected_output_tokens']}" + ("" if r["counts_ok"] else " MISMATCH")]
            for r in results]
    title = f"bench latency: {target.label}, {target.device} {target.dtype}"
    if bw:
        title += f", copy bandwidth {bw / 1e9:,.0f} GB/s"
    print(report.table(["backend", "batch", "input", "output", "prefill ms", "decode ms mean", "p50", "p90",
                        "p99", "floor ms", "decode tok/s", "tokens counted/expected"], rows, title=title))
    out = {"model": target.label, "device": target.device, "dtype": target.dtype,
           "copy_bandwidth_GBps": bw / 1e9 if bw else None, "results": results}
    if args.output_json:
        report.write_json(args.output_json, out)
    if args.plot:
        report.plot_latency(results, args.plot)
    return 0 if all(r["counts_ok"] for r in results) else 1

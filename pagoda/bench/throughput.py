"""`pagoda bench throughput`: offline, in-process throughput of pagoda and its baselines.

Every backend gets the same token-id prompts and generates exactly --output-len tokens per
request (EOS ignored, greedy), so the useful tokens are known in advance and checked against
what each backend actually returned. Baselines run first and release their memory before
pagoda starts, so pagoda's KV-cache sizing sees a free device.
"""
from __future__ import annotations

import argparse
import gc
import time

from pagoda.bench.args import BASELINES, add_common_args


def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = add_common_args(p)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--workload", default="random", choices=("random", "synthetic-chat"),
                     help="random (default) = W1 token ids; synthetic-chat = built-in prompts in the chat template.")
    src.add_argument("--dataset", default=None, help="JSONL file, one {\"prompt\": ...} per line.")
    g.add_argument("--num-prompts", type=int, default=512, help="Requests (default 512, as W1).")
    lens = g.add_mutually_exclusive_group()
    lens.add_argument("--input-len", type=int, default=None, help="Fixed prompt length (random workload).")
    lens.add_argument("--input-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=[128, 1024],
                      help="Prompt length uniform in [LO, HI] (random workload; default 128 1024).")
    g.add_argument("--output-len", type=int, default=256, help="Tokens generated per request (default 256).")
    g.add_argument("--hf-batch-size", type=int, default=64, help="Batch size of the hf backend (default 64).")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="An untimed short run on each backend first.")


def make_prompts(args, target) -> list[list[int]]:
    """Token ids for every request, identical for all backends."""
    from pagoda.bench import model_target, workloads
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts: must be >= 1, got {args.num_prompts}")
    if args.dataset is None and args.workload == "random":
        lo, hi = (args.input_len, args.input_len) if args.input_len is not None else args.input_len_range
        return workloads.random_token_prompts(args.num_prompts, lo, hi, model_target.vocab_size(target),
                                              args.seed)
    tokenizer = target.engine_kwargs.get("tokenizer")
    if target.shape and not tokenizer:
        raise ValueError(f"--model-shape: {target.shape} has no tokenizer; use --workload random or "
                         "give --tokenizer")
    from pagoda.worker import loader
    texts = (workloads.load_jsonl_prompts(args.dataset, args.num_prompts) if args.dataset
             else workloads.synthetic_chat_prompts(args.num_prompts))
    tok = loader.load_tokenizer(loader.resolve_model(target.model, tokenizer))
    if len(tok) > model_target.vocab_size(target):
        raise ValueError(f"--tokenizer: its {len(tok)} tokens do not fit the model's vocabulary of "
                         f"{model_target.vocab_size(target)}")
    if args.dataset:
        return [tok(p).input_ids for p in texts]
    return [workloads.chat_token_ids(tok, p) for p in texts]


def run_pagoda(target, prompts, out_len, warmup, progress) -> tuple[float, list[int], list[int], str]:
    """Returns (seconds, generated tokens per request, prompt tokens per request as seen by pagoda,
    the weight format pagoda ran: 'gguf', 'int8', 'int4' or 'none')."""
    from pagoda.bench.hf_backend import sync
    from pagoda.llm import LLM
    from pagoda.sampling_params import SamplingParams
    llm = LLM(**target.engine_kwargs)
    try:
        if warmup:  # reversed prompts: same lengths, but nothing the prefix cache could reuse later
            llm.generate([p[::-1] for p in prompts[:8]],
                         SamplingParams(temperature=0, max_tokens=min(out_len, 8), ignore_eos=True), use_tqdm=False)
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        sync(target.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=progress)
        sync(target.device)
        dt = time.perf_counter() - t0
        quant = llm.llm_engine.core.worker.quantization
    finally:
        shutdown = getattr(llm, "shutdown", None)
        if shutdown:
            shutdown()
        del llm
        gc.collect()
    return dt, [len(o.outputs[0].token_ids) for o in outs], [len(o.prompt_token_ids) for o in outs], quant


def run_hf(kind, target, prompts, out_len, batch, warmup, progress) -> tuple[float, list[int], list[str]]:
    from pagoda.bench import hf_backend
    model = hf_backend.load_model(target)
    try:
        if kind == "hf-cb":
            return hf_backend.generate_continuous(model, prompts, out_len, target.device, warmup)
        if warmup:
            hf_backend.generate_static(model, prompts[:min(batch, 8)], min(out_len, 8), batch, target.device)
        dt, counts = hf_backend.generate_static(model, prompts, out_len, batch, target.device, progress)
        return dt, counts, []
    finally:
        hf_backend.release(model)


def measure(backend, target, prompts, args) -> dict:
    progress = not args.disable_tqdm
    n, out_len = len(prompts), args.output_len
    in_tokens = sum(map(len, prompts))
    errors: list[str] = []
    weights = target.dtype
    if backend == "pagoda":
        dt, counts, seen_in, quant = run_pagoda(target, prompts, out_len, args.warmup, progress)
        weights = quant if quant in ("gguf", "int8", "int4") else weights
        if seen_in != [len(p) for p in prompts]:
            errors.append("pagoda saw different prompt lengths than were sent")
    else:
        dt, counts, errors = run_hf(backend, target, prompts, out_len, args.hf_batch_size, args.warmup, progress)
    out_tokens = sum(counts)
    expected = n * out_len
    return {"backend": backend, "weights": weights, "elapsed_s": dt, "requests": n, "input_tokens": in_tokens,
            "output_tokens": out_tokens, "expected_output_tokens": expected,
            "counts_ok": len(counts) == n and all(c == out_len for c in counts) and not errors,
            "errors": errors[:3],
            "requests_per_s": n / dt, "input_tok_per_s": in_tokens / dt, "output_tok_per_s": out_tokens / dt}


def reference_backend(backends: list[str]) -> str:
    """Ratios are taken against the first baseline listed (or the first backend if none is)."""
    return next((b for b in backends if b in BASELINES), backends[0])


def validate(args) -> None:
    if args.output_len < 1:
        raise ValueError(f"--output-len: must be >= 1, got {args.output_len}")
    if args.input_len is not None and args.input_len < 1:
        raise ValueError(f"--input-len: must be >= 1, got {args.input_len}")
    if args.hf_batch_size < 1:
        raise ValueError(f"--hf-batch-size: must be >= 1, got {args.hf_batch_size}")


def run(args) -> int:
    from pagoda.bench import model_target, report
    validate(args)
    target = model_target.from_args(args)
    try:
        prompts = make_prompts(args, target)
        order = [b for b in args.backend if b != "pagoda"] + [b for b in args.backend if b == "pagoda"]
        by_name = {b: measure(b, target, prompts, args) for b in order}
    finally:
        model_target.cleanup(target)
    results = [by_name[b] for b in args.backend]
    ref = by_name[reference_backend(args.backend)]
    for r in results:
        r["ratio_vs_" + ref["backend"]] = r["output_tok_per_s"] / ref["output_tok_per_s"]
    rows = [[r["backend"], r["weights"], r["elapsed_s"], r["requests_per_s"], r["input_tok_per_s"], r["output_tok_per_s"],
             f"{r['output_tok_per_s'] / ref['output_tok_per_s']:.2f}x",
             f"{r['output_tokens']:,}/{r['expected_output_tokens']:,}" + ("" if r["counts_ok"] else " MISMATCH")]
            for r in results]
    print(report.table(["backend", "weights", "time (s)", "req/s", "input tok/s", "output tok/s",
                        f"vs {ref['backend']}", "output tokens counted/expected"], rows,
                       title=f"bench throughput: {target.label}, {len(prompts)} requests, "
                             f"{sum(map(len, prompts)):,} prompt tokens, {args.output_len} out each, "
                             f"{target.device}, activations {target.dtype}"))
    for r in results:
        for e in r["errors"]:
            print(f"{r['backend']}: {e}")
    out = {"model": target.label, "device": target.device, "dtype": target.dtype,
           "workload": {"kind": "dataset" if args.dataset else args.workload, "dataset": args.dataset,
                        "num_prompts": len(prompts), "input_tokens": sum(map(len, prompts)),
                        "output_len": args.output_len, "seed": args.seed},
           "reference": ref["backend"], "results": results}
    if args.output_json:
        report.write_json(args.output_json, out)
    if args.plot:
        report.plot_bars([r["backend"] for r in results], [r["output_tok_per_s"] for r in results],
                         "output tokens/s", f"throughput: {target.label} ({target.device})", args.plot)
    return 0 if all(r["counts_ok"] for r in results) else 1

"""W1-sampled, W1-penalties and logprobs=5 against W1 greedy: one engine, one process.

    python benchmarks/w1_sampling_vs_greedy.py --model-shape qwen3-0.6b        # the H200 figure
    python benchmarks/w1_sampling_vs_greedy.py --model-shape llama3-8b
    python benchmarks/w1_sampling_vs_greedy.py --workload synthetic-chat \\
        --num-prompts 8 --output-len 128                                       # bundled model, CPU

Takes `pagoda bench throughput`'s flags (W1 prompts by default: 512 requests, 128..1024 prompt
tokens, 256 out, EOS ignored). Runs greedy, then `temperature 0.8, top_p 0.95` (W1-sampled),
`+ top_k 50, repetition_penalty 1.1` (W1-penalties) and greedy with `logprobs=5`, then greedy
again (the two greedy runs show the run-to-run drift), on the same LLM. Prints output tok/s of
each and its ratio to the first greedy run; issue 11's targets at 512 requests on the H200:
top-p >= 0.9x, top-k + repetition penalty >= 0.85x, logprobs=5 >= 0.8x. --output-json writes
the rows, with the engine's step counts by kind (overlapped steps stay on for every setting).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = [("greedy", {}),
            ("W1-sampled: temperature 0.8, top_p 0.95", {"temperature": 0.8, "top_p": 0.95}),
            ("W1-penalties: + top_k 50, repetition_penalty 1.1",
             {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}),
            ("logprobs=5 (greedy)", {"logprobs": 5}),
            ("greedy again", {})]


def main(argv=None) -> int:
    from pagoda.bench import model_target, report, throughput
    from pagoda.bench.args import sampling_params
    from pagoda.bench.hf_backend import sync
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    throughput.add_cli_args(p)
    args = p.parse_args(argv)
    throughput.validate(args)
    target = model_target.from_args(args)
    from pagoda.llm import LLM
    rows = []
    try:
        prompts = throughput.make_prompts(args, target)
        llm = LLM(**target.engine_kwargs)
        core = llm.llm_engine.core
        if args.warmup:  # every setting once, on reversed prompts (nothing for the prefix cache)
            for _, s in SETTINGS[:4]:
                llm.generate([q[::-1] for q in prompts[:8]], sampling_params(s, 8), use_tqdm=False)
        for name, s in SETTINGS:
            core.step_timing.clear()
            sync(target.device)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sampling_params(s, args.output_len), use_tqdm=not args.disable_tqdm)
            sync(target.device)
            dt = time.perf_counter() - t0
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"setting": name, "sampling": s, "elapsed_s": dt, "output_tokens": n_out,
                         "counts_ok": n_out == len(prompts) * args.output_len,
                         "output_tok_per_s": n_out / dt, "overlap": core.overlap,
                         "steps": {k: v[0] for k, v in core.step_timing.items()}})
            gc.collect()
    finally:
        model_target.cleanup(target)
    base = rows[0]["output_tok_per_s"]
    for r in rows:
        r["vs_greedy"] = r["output_tok_per_s"] / base
    print(report.table(["setting", "time (s)", "output tok/s", "vs greedy", "tokens ok"],
                       [[r["setting"], r["elapsed_s"], r["output_tok_per_s"], f"{r['vs_greedy']:.2f}x",
                         "yes" if r["counts_ok"] else "MISMATCH"] for r in rows],
                       title=f"sampling vs greedy: {target.label}, {len(prompts)} requests, "
                             f"{sum(map(len, prompts)):,} prompt tokens, {args.output_len} out each, "
                             f"{target.device}"))
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump({"model": target.label, "device": target.device, "requests": len(prompts),
                       "output_len": args.output_len, "rows": rows}, fh, indent=1)
    return 0 if all(r["counts_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

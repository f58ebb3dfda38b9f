"""Time to the first token at batch 1, in engine time: issue 17's "a short prompt (<= 32 new
tokens, batch 1) gets its first token in <= 4 ms of engine time" (H200, Qwen3-0.6B shape).

One request at a time on an otherwise idle engine, driven step by step (EngineCore.step, no
front end, no server): `first_token_ms` is the engine time from the request's arrival in the core
to the step that hands back its first token; with overlapped steps (the CUDA default) that is
the prefill step plus the next step, which launches the following decode and then reads the
prefill's token back. `prefill_step_ms` is the first of those steps alone. Cases:
  cold-N      N prompt tokens, none of them cached (fresh random tokens each time)
  hit-P+N     P tokens found in the prefix cache (the prefix sent once before), N new ones
Each case is warmed up, then measured --iters times, with overlapped steps and without (on
CUDA); the JSON has the median, p90, min and max, the step kinds seen (eager / decode-graph), how
many steps the first token took and how many prompt tokens the prefix cache gave.

On the H200:
    python benchmarks/gpu_first_token.py --out $OUT/first_token.json
On the CPU (a check of the script, with the tiny shape):
    python benchmarks/gpu_first_token.py --model-shape tiny-llama --device cpu --iters 5 --out /tmp/ft.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cases(spec: str) -> list[tuple[int, int]]:
    """"16,32,128+3,128+16" -> [(0, 16), (0, 32), (128, 3), (128, 16)] as (cached, new)."""
    out = []
    for part in spec.split(","):
        cached, _, new = part.strip().rpartition("+")
        out.append((int(cached or 0), int(new)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cases", default="16,32,128+3,128+16,128+32",
                    help="comma-separated N (N uncached prompt tokens) or P+N (P cached, N new)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON results file")
    a = ap.parse_args()

    import torch
    from pagoda import LLM, SamplingParams
    from pagoda.bench.shapes import write_model_dir

    d = write_model_dir(a.model_shape)
    t = time.perf_counter()
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, device=a.device,
              enable_prefix_caching=True)
    start_s = time.perf_counter() - t
    eng = llm.llm_engine
    core = eng.core
    vocab = eng.model_config.vocab_size
    rng = random.Random(a.seed)
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ids = iter(range(10**9))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def run(prompt: list[int]) -> dict:
        """One request through the core alone; engine time until its first token comes back."""
        rid = f"ft-{next(ids)}"
        eng.add_request(rid, {"prompt_token_ids": prompt}, sp)  # front end: not timed
        steps, first_ms, prefill_ms, kinds, engine_s = 0, None, None, [], 0.0
        hits0 = hits1 = core.scheduler.stats().prefix_cache_hits
        while eng.has_unfinished_requests():
            t0 = time.perf_counter()
            out = core.step()
            dt = time.perf_counter() - t0
            eng.output_processor.process_outputs(out.outputs, out.timestamp, final_only=True)
            hits1 = out.scheduler_stats.prefix_cache_hits
            if first_ms is not None:
                continue  # let the request finish (not timed)
            steps += 1
            engine_s += dt
            kinds.append(out.scheduler_stats.step_kind)
            if prefill_ms is None:
                prefill_ms = dt * 1e3
            if any(o.request_id.startswith(rid) and o.new_token_ids for o in out.outputs):
                first_ms = engine_s * 1e3
        if first_ms is None:
            raise RuntimeError(f"request {rid} finished without a token")
        return {"first_token_ms": first_ms, "prefill_step_ms": prefill_ms, "steps": steps, "kinds": kinds,
                "cache_hit_tokens": hits1 - hits0}

    results = []
    modes = [True, False] if core.overlap else [False]  # overlapped steps are the CUDA default
    for overlap, (cached, new) in ((o, c) for o in modes for c in _cases(a.cases)):
        core.overlap = overlap
        prefix = tokens(cached)
        if cached:
            run(prefix + tokens(new))  # the prefix enters the cache
        for _ in range(a.warmup):
            run(prefix + tokens(new))
        runs = [run(prefix + tokens(new)) for _ in range(a.iters)]
        first = sorted(r["first_token_ms"] for r in runs)
        pre = sorted(r["prefill_step_ms"] for r in runs)
        name = (f"hit-{cached}+{new}" if cached else f"cold-{new}") + (" overlap" if overlap else "")
        row = {"case": name, "overlap": overlap, "cached_tokens": cached, "new_tokens": new, "iters": a.iters,
               "first_token_ms_median": statistics.median(first),
               "first_token_ms_p90": first[int(0.9 * (len(first) - 1))],
               "first_token_ms_min": first[0], "first_token_ms_max": first[-1],
               "prefill_step_ms_median": statistics.median(pre),
               "steps_to_first_token": sorted({r["steps"] for r in runs}),
               "cache_hit_tokens": sorted({r["cache_hit_tokens"] for r in runs}),
               "step_kinds": sorted({k for r in runs for k in r["kinds"] if k})}
        results.append(row)
        print(f"{name:>20}: first token {row['first_token_ms_median']:.2f} ms median "
              f"(p90 {row['first_token_ms_p90']:.2f}, min {row['first_token_ms_min']:.2f}), prefill step "
              f"{row['prefill_step_ms_median']:.2f} ms, steps {row['steps_to_first_token']}, cached "
              f"{row['cache_hit_tokens']}, kinds {row['step_kinds']}", flush=True)
    dev = core.worker.device
    info = {"model_shape": a.model_shape, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "engine_start_s": start_s, "step_timing": core.step_timing,
            "target": "first_token_ms_median <= 4 for <= 32 new tokens at batch 1 (H200)",
            "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""W1 with a quantized KV cache and quantized weights, each beside its own 16-bit baseline, in one
run (one device call on an H200, under 8 minutes):

    python benchmarks/quant_w1.py --out $OUT/quant_w1.json

- Qwen3-0.6B shape (KV-cache-read bound): --kv-cache-dtype auto vs int8 vs fp8;
- Llama-3-8B shape (prefill-compute bound): bf16 weights vs --quantization fp8.
Random weights (pagoda.bench.shapes, --load-format dummy); each configuration is one
`pagoda bench throughput --backend pagoda` in a fresh process, so each memory plan sees a free
device. Writes every run's JSON plus the speedup of each over its shape's baseline; exits 1 when
a run failed or missed tokens. `--model-shapes tiny-llama --num-prompts 4 ...` runs it on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shape -> configurations (name, extra flags); the first is the baseline
PLAN = {
    "qwen3-0.6b": [("kv-auto", []), ("kv-int8", ["--kv-cache-dtype", "int8"]),
                   ("kv-fp8", ["--kv-cache-dtype", "fp8"])],
    "llama3-8b": [("bf16", []), ("w-fp8", ["--quantization", "fp8"])],
}
TINY = {"tiny-llama": PLAN["qwen3-0.6b"][:2] + [("w-fp8", ["--quantization", "fp8"])]}


def run_one(shape: str, flags: list[str], args, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "bench", "throughput", "--backend", "pagoda",
           "--model-shape", shape, "--num-prompts", str(args.num_prompts), "--output-len",
           str(args.output_len), "--input-len-range", *map(str, args.input_len_range),
           "--output-json", out_json, "--disable-tqdm", *flags]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    rec = {"shape": shape, "flags": flags, "rc": p.returncode, "wall_s": round(time.time() - t0, 1),
           "log_tail": (p.stdout + p.stderr)[-1500:]}
    if p.returncode == 0 and os.path.exists(out_json):
        res = json.load(open(out_json))["results"][0]
        rec.update(elapsed_s=res["elapsed_s"], output_tok_per_s=res["output_tok_per_s"],
                   counts_ok=res["counts_ok"], weights=res["weights"])
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shapes", nargs="+", default=list(PLAN))
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--input-len-range", type=int, nargs=2, default=[128, 1024])
    p.add_argument("--timeout", type=int, default=200, help="Seconds per configuration.")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "quant_w1.json"))
    args = p.parse_args()
    plan = {**PLAN, **TINY}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    runs, ok = [], True
    for shape in args.model_shapes:
        base = None
        for name, flags in plan[shape]:
            try:
                rec = run_one(shape, flags, args, f"{os.path.splitext(args.out)[0]}_{shape}_{name}.json")
            except subprocess.TimeoutExpired:
                rec = {"shape": shape, "flags": flags, "rc": "timeout"}
            rec["name"] = name
            if "elapsed_s" not in rec or not rec.get("counts_ok"):
                ok = False
            elif base is None:
                base = rec
            if base is not None and "elapsed_s" in rec:
                rec["speedup_vs_baseline"] = round(base["elapsed_s"] / rec["elapsed_s"], 3)
            runs.append(rec)
            print(f"{shape:12s} {name:8s} rc={rec['rc']} time={rec.get('elapsed_s', float('nan')):.2f}s "
                  f"tok/s={rec.get('output_tok_per_s', float('nan')):.0f} "
                  f"x{rec.get('speedup_vs_baseline', float('nan'))}", flush=True)
    json.dump({"runs": runs, "ok": ok}, open(args.out, "w"), indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The CPU's ceilings beside pagoda's packed GGUF kernel, in one run.

    python benchmarks/cpu_ceilings.py [--threads 2] [--model file.gguf] [--out ceilings.json]

Ceilings (torch, --threads threads): memory copy GB/s (bytes read + written, 256 MiB buffers),
memory read GB/s (a sum over 256 MiB) and fp32 matmul GFLOP/s (2048^3). Then the model's own
projections as the file stores them (default: the bundled SmolLM2 GGUF, Q4_1 layers and a Q8_0
head) through pagoda/kernels/cpu_gguf.c for each instruction set this CPU runs: the time of all
of one decode step's matmuls at 1 and 8 tokens and of a 256-token prefill chunk, with the bytes
read per second and GFLOP/s they reach, so a step's time can be read against the floors
(bytes / read bandwidth at one token, FLOP / matmul rate at eight). Each figure is the best of
several repeats. Layer weights are distinct copies, as in the model, so they stream from memory
rather than cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's pagoda


def best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ceilings(reps: int) -> dict:
    n = 256 << 20
    a = torch.ones(n // 4)
    b = torch.empty_like(a)
    copy = 2 * n / best_of(lambda: b.copy_(a), reps)
    read = n / best_of(lambda: a.sum(), reps)
    m = torch.randn(2048, 2048)
    mm = 2 * 2048 ** 3 / best_of(lambda: m @ m, reps)
    return {"copy_GBps": copy / 1e9, "read_GBps": read / 1e9, "matmul_fp32_GFLOPs": mm / 1e9}


def model_matmuls(path: str, reps: int) -> list[dict]:
    """The step's projections (every layer's, and the head) as the GGUF stores them."""
    from gguf import GGUFReader
    from pagoda.kernels import cpu_build, cpu_gguf
    reader = GGUFReader(path)
    mats = []
    for t in reader.tensors:
        if len(t.data.shape) == 2 and int(t.tensor_type) in cpu_gguf.BLOCKS:
            rows = torch.from_numpy(t.data.copy())
            k = int(t.shape[0])
            mats.append((cpu_gguf.make_parts([cpu_gguf.Part(rows, int(t.tensor_type))]), rows, k,
                         rows.shape[0]))
    nbytes = sum(r.numel() for _, r, _, _ in mats)
    weights = sum(k * n for _, _, k, n in mats)
    out = []
    for isa in cpu_build.supported_isas():
        for M in (1, 8, 256):
            xs = {k: torch.randn(M, k) for k in {k for _, _, k, _ in mats}}

            def step():
                for parts, _, k, n in mats:
                    cpu_gguf.gguf_matmul(xs[k], parts, k, n, None, isa)
            dt = best_of(step, reps if M < 256 else max(2, reps // 3))
            out.append({"isa": isa, "tokens": M, "ms": dt * 1e3, "weight_MB": nbytes / 1e6,
                        "read_GBps": nbytes / dt / 1e9, "GFLOPs": 2 * M * weights / dt / 1e9})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", help="write the figures as JSON here too")
    a = ap.parse_args()
    from pagoda.worker.threads import set_threads
    from pagoda.worker.loader import bundled_model_path
    set_threads(a.threads)
    path = a.model or bundled_model_path()
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "load_avg_at_start": os.getloadavg(), "threads": a.threads, "model": os.path.basename(path)}
    res.update(ceilings(a.reps))
    print(f"{res['machine']}, {a.threads} threads, load average {res['load_avg_at_start'][0]:.2f}")
    print(f"copy {res['copy_GBps']:.1f} GB/s (read + write)   read {res['read_GBps']:.1f} GB/s   "
          f"fp32 matmul {res['matmul_fp32_GFLOPs']:.0f} GFLOP/s")
    res["packed_matmuls"] = model_matmuls(path, a.reps)
    print(f"{res['model']}: every projection of one step, packed "
          f"({res['packed_matmuls'][0]['weight_MB']:.0f} MB of blocks)")
    for r in res["packed_matmuls"]:
        print(f"  {r['isa']:7s} {r['tokens']:4d} tokens: {r['ms']:8.2f} ms   {r['read_GBps']:6.1f} GB/s "
              f"of blocks   {r['GFLOPs']:6.0f} GFLOP/s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

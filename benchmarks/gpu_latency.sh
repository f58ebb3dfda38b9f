#!/usr/bin/env bash
# Latency sweep on one GPU: prefill time and per-token decode time (p50/p90/p99) for batch
# 1/8/32 x prompt 128/1024, 128 tokens out, pagoda vs transformers generate, with the
# memory-bandwidth floor beside. Writes benchmarks/results/latency_<shape>.json and
# docs/bench_latency_<shape>.png.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
for shape in ${SHAPES:-qwen3-0.6b llama3-8b}; do
  pagoda bench latency --model-shape "$shape" --backend pagoda,hf \
    --batch-size 1 8 32 --input-len 128 1024 --output-len 128 \
    --output-json "benchmarks/results/latency_${shape}.json" --plot "docs/bench_latency_${shape}.png"
done

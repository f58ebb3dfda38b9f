#!/usr/bin/env bash
# Batch-1 decode on one GPU, both W1 shapes: ms per token, pagoda vs transformers in one process
# per shape, with the floor (weight bytes / measured copy bandwidth) beside. BENCHMARKS.md's
# "batch-1 decode" rows. Writes $OUT/lat_<shape>.json (OUT defaults to benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}; mkdir -p "$OUT"
for shape in ${SHAPES:-qwen3-0.6b llama3-8b}; do
  python3 -m pagoda.entrypoints.cli bench latency --model-shape "$shape" --backend pagoda,hf --batch-size 1 \
    --input-len 128 --output-len 64 --max-model-len 2048 --disable-tqdm \
    --output-json "$OUT/lat_$shape.json" 2>&1 | grep -v Warning | tail -4
done

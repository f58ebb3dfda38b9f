#!/usr/bin/env bash
# W1 (../shared/bench/README.md) on one GPU: 512 random-id prompts of 128-1024 tokens, 256 tokens
# out each, greedy, EOS ignored; pagoda vs transformers generate (batch 64) and generate_batch,
# in one process per model shape. Writes benchmarks/results/w1_<shape>.json and docs/bench_w1_<shape>.png.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
for shape in ${SHAPES:-qwen3-0.6b llama3-8b}; do
  pagoda bench throughput --model-shape "$shape" --backend pagoda,hf,hf-cb \
    --num-prompts 512 --input-len-range 128 1024 --output-len 256 --seed 0 --hf-batch-size 64 \
    --output-json "benchmarks/results/w1_${shape}.json" --plot "docs/bench_w1_${shape}.png"
done

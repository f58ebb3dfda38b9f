#!/usr/bin/env bash
# One device call: W1 on both shapes with the engine defaults (pagoda vs HF generate, each shape
# in one process), then pagoda alone on the Llama-3-8B shape at --max-num-seqs 256 for comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B="python3 -m pagoda.entrypoints.cli bench"
W1="--num-prompts 512 --input-len-range 128 1024 --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm"
for shape in llama3-8b qwen3-0.6b; do
  $B throughput --model-shape $shape --backend pagoda,hf $W1 --output-json "$OUT/w1_$shape.json" 2>&1 \
    | grep -v Warning | tail -4
done
timeout 100 $B throughput --model-shape llama3-8b --backend pagoda $W1 --max-num-seqs 256 2>&1 | grep -v Warning | tail -2

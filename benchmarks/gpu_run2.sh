#!/usr/bin/env bash
# One device call: GPU tests, W1 on the Qwen3-0.6B shape (pagoda vs HF generate, same process),
# batch-1 decode latency on both shapes (pagoda vs HF, with the bandwidth floor).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B="python3 -m pagoda.entrypoints.cli bench"
gpu_tests
$B throughput --model-shape qwen3-0.6b --backend pagoda,hf --num-prompts 512 --input-len-range 128 1024 \
  --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm \
  --output-json "$OUT/w1_qwen3.json" 2>&1 | grep -v Warning | tail -5
for shape in qwen3-0.6b llama3-8b; do
  $B latency --model-shape $shape --backend pagoda,hf --batch-size 1 --input-len 128 --output-len 64 \
    --max-model-len 2048 --disable-tqdm --output-json "$OUT/lat_$shape.json" 2>&1 | grep -v Warning | tail -4
done

#!/usr/bin/env bash
# One device call: W1 on the Llama-3-8B shape (pagoda vs HF generate, same process), then the
# overlap profile on that shape (decode step at batch 256; W1 at 512 sequences, pagoda only).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B="python3 -m pagoda.entrypoints.cli bench"
$B throughput --model-shape llama3-8b --backend pagoda,hf --num-prompts 512 --input-len-range 128 1024 \
  --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm \
  --output-json "$OUT/w1_llama3.json" 2>&1 | grep -v Warning | tail -6
timeout 150 python3 benchmarks/gpu_overlap_profile.py llama3-8b 2>&1 | grep -E "W1|decode step|Error"
timeout 90 python3 benchmarks/gpu_overlap_profile.py llama3-8b '{"max_num_seqs": 512, "max_num_batched_tokens": 16384}' quick 2>&1 | grep -E "W1|Error"

#!/usr/bin/env bash
# Device call 3: stash the first half of the bundled GGUF and the server wheels on the machine
# (the next call brings the second half), GPU tests, then W1 on the Llama-3-8B shape, pagoda vs
# HF generate in the same process.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
stash_first_half_and_wheels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
gpu_tests
python3 -m pagoda.entrypoints.cli bench throughput --model-shape llama3-8b --backend pagoda,hf --num-prompts 512 \
  --input-len-range 128 1024 --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm \
  --output-json "$OUT/w1_llama3-8b.json" 2>&1 | grep -v Warning | tail -5

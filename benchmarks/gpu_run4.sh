#!/usr/bin/env bash
# Device call 4 (right after call 3, same warm machine): reassemble the bundled GGUF, check
# `pagoda serve` with the openai SDK, then W1 on the Qwen3-0.6B shape, pagoda vs HF generate.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
join_bundled_gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PAGODA_CACHE_DIR=/tmp/pagoda-cache
timeout 300 python3 benchmarks/gpu_serve_check.py /tmp/smollm2.gguf 2>&1 | grep -v Warning | tail -12
python3 -m pagoda.entrypoints.cli bench throughput --model-shape qwen3-0.6b --backend pagoda,hf --num-prompts 512 \
  --input-len-range 128 1024 --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm \
  --output-json "$OUT/w1_qwen3.json" 2>&1 | grep -v Warning | tail -5

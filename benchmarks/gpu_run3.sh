#!/usr/bin/env bash
# Device call 3: stash the first half of the bundled GGUF and the server wheels on the machine
# (the next call brings the second half), GPU tests, then W1 on the Llama-3-8B shape, pagoda vs
# HF generate in the same process.
set -uo pipefail
cd "$(dirname "$0")/.."
cp .gguf_parts/part_aa /tmp/gguf_a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | tail -12
python3 -m pagoda.entrypoints.cli bench throughput --model-shape llama3-8b --backend pagoda,hf --num-prompts 512 \
  --input-len-range 128 1024 --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm \
  --output-json "$OUT/w1_llama3-8b.json" 2>&1 | grep -v Warning | tail -5

#!/usr/bin/env bash
# Session 2, device call A: stash the server wheels and the first half of the bundled GGUF (the
# next call brings the second half), GPU tests on the final tree, then batch-1 decode latency on
# both shapes (pagoda vs HF in one process each), re-measured with overlapped steps.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
stash_first_half_and_wheels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
gpu_tests
for shape in qwen3-0.6b llama3-8b; do
  python3 -m pagoda.entrypoints.cli bench latency --model-shape $shape --backend pagoda,hf --batch-size 1 \
    --input-len 128 --output-len 64 --max-model-len 2048 --disable-tqdm \
    --output-json "$OUT/lat_$shape.json" 2>&1 | grep -v Warning | tail -4
done

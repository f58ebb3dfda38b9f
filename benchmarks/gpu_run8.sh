#!/usr/bin/env bash
# Session 2, device call A: stash the server wheels and the first half of the bundled GGUF (the
# next call brings the second half), GPU tests on the final tree, then batch-1 decode latency on
# both shapes (pagoda vs HF in one process each), re-measured with overlapped steps.
set -uo pipefail
cd "$(dirname "$0")/.."
cp .gguf_parts/part_aa /tmp/gguf_a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | tail -12
for shape in qwen3-0.6b llama3-8b; do
  python3 -m pagoda.entrypoints.cli bench latency --model-shape $shape --backend pagoda,hf --batch-size 1 \
    --input-len 128 --output-len 64 --max-model-len 2048 --disable-tqdm \
    --output-json "$OUT/lat_$shape.json" 2>&1 | grep -v Warning | tail -4
done

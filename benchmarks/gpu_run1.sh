#!/usr/bin/env bash
# One device call: GPU tests, then W1 and batch-1 decode on the Qwen3-0.6B shape, pagoda vs HF
# transformers in the same process. Needs fastapi-free imports only (runs on the bare GPU image).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/test_gpu.txt"
python3 -m pagoda.entrypoints.cli bench throughput --model-shape qwen3-0.6b --backend pagoda,hf \
  --num-prompts 512 --input-len-range 128 1024 --output-len 256 --seed 0 --hf-batch-size 64 \
  --max-model-len 2048 --disable-tqdm --output-json "$OUT/w1_qwen3.json" 2>&1 | grep -v Warning | tail -12
python3 -m pagoda.entrypoints.cli bench latency --model-shape qwen3-0.6b --backend pagoda,hf --batch-size 1 --input-len 128 --output-len 64 --max-model-len 2048 --disable-tqdm --output-json "$OUT/lat_qwen3.json" 2>&1 | grep -v Warning | tail -12

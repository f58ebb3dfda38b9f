#!/usr/bin/env bash
# One device call: GPU tests (overlapped steps included), W1 on the Qwen3-0.6B shape (pagoda vs
# HF generate, same process), then the overlap profile (pagoda only, default and 512 seqs).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B="python3 -m pagoda.entrypoints.cli bench"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
gpu_tests
python3 benchmarks/gpu_overlap_profile.py qwen3-0.6b 2>&1 | grep -E "W1|decode step|Error" 
python3 benchmarks/gpu_overlap_profile.py qwen3-0.6b '{"max_num_seqs": 512, "max_num_batched_tokens": 16384}' 2>&1 | grep -E "W1|Error"
$B throughput --model-shape qwen3-0.6b --backend pagoda,hf --num-prompts 512 --input-len-range 128 1024 \
  --output-len 256 --seed 0 --hf-batch-size 64 --max-model-len 2048 --disable-tqdm \
  --output-json "$OUT/w1_qwen3.json" 2>&1 | grep -v Warning | tail -6

#!/usr/bin/env bash
# Session 2, device call B (right after call A, same warm machine): reassemble the bundled GGUF and
# check `pagoda serve` (overlapped steps) with the openai SDK: SmolLM2 and a Qwen3-0.6B shape.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
join_bundled_gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PAGODA_CACHE_DIR=/tmp/pagoda-cache
timeout 400 python3 benchmarks/gpu_serve_check.py /tmp/smollm2.gguf 2>&1 | grep -v Warning | tail -14

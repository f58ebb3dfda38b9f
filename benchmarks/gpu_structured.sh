#!/usr/bin/env bash
# One device call (issue 14): W1 with half the requests under a JSON schema vs unconstrained W1
# (and unconstrained step by step, for context), Qwen3-0.6B shape, one process. Grammars compile
# against the bundled SmolLM2 tokenizer (the shape has none). Needs the xgrammar and
# apache-tvm-ffi wheels among .whl/ and the GGUF's first half stashed by an earlier call
# (benchmarks/gpu_common.sh); without the GGUF, pass TOKENIZER=<a tokenizer directory>.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PAGODA_CACHE_DIR=/tmp/pagoda-cache
if [ -z "${TOKENIZER:-}" ]; then join_bundled_gguf; TOKENIZER=/tmp/smollm2.gguf; fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 benchmarks/w1_structured.py --model-shape qwen3-0.6b --max-model-len 2048 --seed 0 \
  --tokenizer "$TOKENIZER" --disable-tqdm --output-json "$OUT/w1_structured_qwen3-0.6b.json" 2>&1 \
  | grep -v Warning | tail -8

#!/usr/bin/env bash
# The GPU figures still to measure, as one script per device call (each well under 10 minutes on
# an H200). Run from the repository root on the device machine, with the server wheels carried
# in .whl/ (see the device tool's README) — for example:
#   bash benchmarks/gpu_session.sh tests        # tests/test_gpu*.py
#   bash benchmarks/gpu_session.sh w1-http      # W1 offline and W1-HTTP, both shapes (issue 10)
#   bash benchmarks/gpu_session.sh latency      # batch-1 decode, both shapes
#   bash benchmarks/gpu_session.sh sampling     # W1 greedy vs sampled / penalties / logprobs=5 (issue 11)
#   bash benchmarks/gpu_session.sh quant        # W1: KV auto/int8/fp8 (Qwen3-0.6B), bf16/fp8 weights (Llama-3-8B)
#   bash benchmarks/gpu_session.sh vision       # V1 images/s: transformers, offline, serve (issue 12)
#   bash benchmarks/gpu_session.sh structured   # W1 half under a JSON schema vs free (issue 14;
#                                               # first `bash benchmarks/gpu_structured.sh prepare` here)
# VISION_SHAPE=tiny VISION_IMAGES=8 runs the vision case small (a smoke run on a CPU);
# VISION_ARGS="--skip hf" leaves runs out (without HF, offline and serve may fit one call: unmeasured);
# SHAPE=tiny-llama W1_ARGS="--num-prompts 8 --input-len-range 16 64 --output-len 16" the sampling case.
# Everything is written under $OUT (the device tool brings it back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -q tests/test_gpu.py tests/test_gpu_sliding_window.py -p no:cacheprovider 2>&1 \
      | tee "$OUT/test_gpu.txt" | tail -15
    # its own process: the CPU test files switch Triton to the interpreter
    python3 -m pytest -q tests/test_gpu_quant.py -p no:cacheprovider 2>&1 \
      | tee "$OUT/test_gpu_quant.txt" | tail -15 ;;
  w1-http)
    for shape in qwen3-0.6b llama3-8b; do
      timeout 280 python3 benchmarks/w1_http_vs_offline.py --model-shape "$shape" --engine-core process \
        --out "$OUT/w1_http_$shape.json" 2>&1 | tail -3
    done ;;
  latency)
    OUT="$OUT" bash benchmarks/latency_b1.sh ;;
  sampling)
    # issue 11, about 4 minutes on an H200: the sampling kernels against their twins on the GPU,
    # then W1 (512 requests, Qwen3-0.6B shape, random weights) greedy vs temperature/top_p vs
    # + top_k + repetition_penalty vs logprobs=5 in one engine, interleaved 3 times (medians and
    # ratios in w1_sampling.json, rewritten after each run), then the sampler alone on 512 rows
    # of the real vocabulary.
    # SHAPE and W1_ARGS (extra flags, e.g. a small --num-prompts) let it run on a CPU at tiny size.
    shape=${SHAPE:-qwen3-0.6b}
    timeout 90 python3 -m pytest -q tests/test_gpu_sampling.py -p no:cacheprovider 2>&1 \
      | tee "$OUT/test_gpu_sampling.txt" | tail -3
    timeout 300 python3 benchmarks/w1_sampling_vs_greedy.py --model-shape "$shape" --repeats 3 \
      --disable-tqdm --output-json "$OUT/w1_sampling.json" ${W1_ARGS:-} 2>&1 \
      | tee "$OUT/w1_sampling.txt" | grep -v "^INFO" | tail -12
    timeout 45 python3 benchmarks/w1_sampling_vs_greedy.py --model-shape "$shape" --sampler-only \
      --repeats 10 --output-json "$OUT/sampler_only.json" ${W1_ARGS:-} 2>&1 | tail -9 ;;
  vision)
    # Qwen2.5-VL-3B shape, random bf16 weights, 512 images of 448x448; figures land in
    # $OUT/v1.json after each of the three runs, so a run cut short keeps the others
    timeout "${VISION_TIMEOUT:-460}" python3 benchmarks/v1_images.py --shape "${VISION_SHAPE:-3b}" \
      --num-images "${VISION_IMAGES:-512}" --out "$OUT/v1.json" ${VISION_ARGS:-} 2>&1 | tee "$OUT/v1.txt" | tail -12 ;;
  structured)
    OUT="$OUT" NO_WHEELS=1 bash benchmarks/gpu_structured.sh ;;
  quant)
    python3 benchmarks/quant_w1.py --out "$OUT/quant_w1.json" 2>&1 | tee "$OUT/quant_w1.txt" ;;
  *)
    echo "usage: $0 tests|w1-http|latency|sampling|vision|structured|quant" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Issue 14's figure in ONE device call: W1 with half the requests under a JSON schema vs
# unconstrained W1 (and unconstrained step by step, for context), Qwen3-0.6B shape, one process,
# JSON to $OUT/w1_structured_qwen3-0.6b.json (and the log beside it).
#
# Random-weight shapes have no tokenizer, and the bundled GGUF is too big for one call; grammars
# compile against the bundled SmolLM2's tokenizer, which travels (3.5 MB) inside .whl/ with the
# wheels the device image lacks (xgrammar, apache-tvm-ffi, msgspec, pyzmq, gguf, pydantic; ~11 MB):
#   here, once:   bash benchmarks/gpu_structured.sh prepare
#   device call:  carry [".whl"], command  bash benchmarks/gpu_structured.sh
# Or `bash benchmarks/gpu_session.sh structured`, the same run. On the CPU, as a smoke test:
#   SHAPE=tiny-llama ARGS="--num-prompts 16 --output-len 32 --input-len-range 16 64" \
#     bash benchmarks/gpu_structured.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-.whl}
TOK="$WHL/smollm2-tokenizer"

if [ "${1:-run}" = prepare ]; then  # on the machine with the checkout's venv
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  mkdir -p "$WHL"
  # what pagoda needs beyond the device image, at the versions installed here, unless .whl has it
  for pkg in xgrammar apache-tvm-ffi msgspec pyzmq gguf pydantic pydantic-core annotated-types typing-inspection; do
    ls "$WHL"/"${pkg//-/_}"-*.whl >/dev/null 2>&1 && continue
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHL" "$pkg==$("$PY" -m pip show "$pkg" | sed -n 's/^Version: //p')" || exit 1
  done
  "$PY" - "$TOK" <<'EOF' || exit 1
import shutil, sys
from pagoda.worker import loader
shutil.copytree(loader._gguf_side_dir(loader.bundled_model_path()), sys.argv[1], dirs_exist_ok=True)
EOF
  du -sh "$WHL"; exit 0
fi

OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPE=${SHAPE:-qwen3-0.6b}
if ls "$WHL"/*.whl >/dev/null 2>&1 && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PAGODA_CACHE_DIR=${PAGODA_CACHE_DIR:-/tmp/pagoda-cache}
PY=${PYTHON:-python3}
"$PY" -c "import xgrammar" || { echo "xgrammar is missing: run 'bash $0 prepare' here and carry $WHL" >&2; exit 1; }
if [ -z "${TOKENIZER:-}" ]; then
  [ -f "$TOK/tokenizer.json" ] || { echo "no tokenizer at $TOK: run 'bash $0 prepare' here" >&2; exit 1; }
  TOKENIZER=$TOK
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# W1 is ~5 s a run on an H200; 420 s bounds the call well inside 8 minutes even if the host is slow
# shellcheck disable=SC2086
timeout 420 "$PY" benchmarks/w1_structured.py --model-shape "$SHAPE" --max-model-len 2048 --seed 0 \
  --tokenizer "$TOKENIZER" --disable-tqdm --output-json "$OUT/w1_structured_$SHAPE.json" ${ARGS:-} 2>&1 \
  | grep -v Warning | tee "$OUT/w1_structured_$SHAPE.log" | tail -8

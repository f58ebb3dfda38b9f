#!/usr/bin/env bash
# W1 offline, the build before the engine-core work (81329ad, unpacked into .old81329ad/ by
#   mkdir -p .old81329ad && git archive 81329ad pagoda benchmarks | tar -x -C .old81329ad
# ) and this build, interleaved in one call: old, new, old, new (ROUNDS=1: old, new). Writes $OUT/w1_offline_{old,new}_N.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
shape=${1:-qwen3-0.6b}
run() {  # $1 = label, $2 = tree
  (cd "$2" && PYTHONPATH="/tmp/site:$PWD" timeout 200 python3 -m pagoda.entrypoints.cli bench throughput \
    --model-shape "$shape" --backend pagoda --num-prompts 512 --input-len-range 128 1024 --output-len 256 \
    --seed 0 --max-model-len 2048 --output-json "$OUT/w1_offline_$1.json" 2>&1 | grep -v -i warn | tail -2 | sed "s/^/$1 /")
}
for i in $(seq "${ROUNDS:-2}"); do run "old_$i" .old81329ad; run "new_$i" .; done

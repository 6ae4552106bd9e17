#!/usr/bin/env bash
# The test suite (CPU). GPU tests are marked `gpu` and skip themselves without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec python -m pytest -q --timeout=300 "$@"

#!/usr/bin/env bash
# GPU smoke test (see bench/gpu_smoke.py): creates the venv if needed, then runs it.
#   bash bench/gpu_smoke.sh [--device cpu] [--steps N] [--peak-tflops T] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
make --silent venv
exec .venv/bin/python bench/gpu_smoke.py "$@"

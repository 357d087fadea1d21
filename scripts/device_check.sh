#!/usr/bin/env bash
# The first run on a GPU (scripts/device_check.py): correctness, speed, memory, as JSON in $OUT.
#
#   scripts/device_check.sh             on a machine with one NVIDIA GPU (under 8 minutes on an H200)
#   scripts/device_check.sh --dry-run   the same sections on a CPU with tiny shapes
#
# jlora runs from this checkout (PYTHONPATH), nothing is installed; the JAX and PyTorch workers share
# the GPU, so JAX does not take most of its memory up front.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
out="${OUT:-$repo/device_check_out}"
exec "${PYTHON:-python3}" "$repo/scripts/device_check.py" --out "$out" "$@"

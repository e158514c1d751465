#!/usr/bin/env bash
# ./train.sh [args] = python -m train [args], runnable from anywhere (paths stay relative to $PWD).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m train "$@"

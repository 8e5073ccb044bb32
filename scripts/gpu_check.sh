#!/usr/bin/env bash
# One-command GPU check of dopd (docs/gpu_check.md): installs what is missing from a folder of wheels, builds
# random-weight Qwen3-shaped models, measures the chunked loss and a DOPD step against opd-priv, runs the gpu
# tests, and writes one JSON. The work is in scripts/gpu_check.py; every argument is passed on to it.
#
#   bash scripts/gpu_check.sh --wheels .whl     # on the GPU machine (no network); JSON: runs/gpu_check/gpu_check.json
#   bash scripts/gpu_check.sh --tiny            # on the CPU at tiny shapes, in seconds (the test suite runs it)
#   bash scripts/gpu_check.sh --help
set -euo pipefail
export PYTHONUNBUFFERED=1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$python" "$here/gpu_check.py" "$@"

#!/usr/bin/env bash
# Every GPU check of moec in one command, for a bare GPU machine without network:
#   benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (see benchmarks/README.md)
#   benchmarks/gpu_check.sh OUT_DIR --dry-run  # the same steps on the CPU with tiny shapes
# The steps and the JSON it writes: benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"

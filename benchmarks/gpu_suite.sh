#!/usr/bin/env bash
# The whole GPU suite in one device call (< 7 min): see benchmarks/gpu_suite.py and benchmarks/README.md.
#   bash benchmarks/gpu_suite.sh "$OUT"              # on the GPU machine, carry [".whl", "quietstar/data"]
#   bash benchmarks/gpu_suite.sh DIR --dry-run       # the CPU rehearsal of the same call
set -u
OUT="${1:?usage: benchmarks/gpu_suite.sh OUTDIR [gpu_suite.py options]}"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py --out "$OUT" "$@"

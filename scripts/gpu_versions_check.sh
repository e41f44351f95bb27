#!/usr/bin/env bash
# Run the CPU test suite with the GPU machine's versions (Python 3.12, torch 2.11, triton 3.6.0,
# transformers 5.17), on this CPU, before spending a GPU lease: an API that differs between torch 2.11
# (the GPU machine) and torch 2.13 (here and in CI) then fails here, not in the GPU call.
#   bash scripts/gpu_versions_check.sh [VENV] [pytest args...]
# VENV (default /tmp/venv-gpu-versions) is created if missing, with $PYTHON (default: Python 3.12, found
# as python3.12 or through pyenv). PyPI's torch 2.11 is the CUDA build: about 3 GB of downloads (CUDA
# libraries), which run on a CPU. The suite runs on a fresh clone of HEAD, so uncommitted changes are
# not tested. Then, with the GPU machine's numpy 2.5.2 (the interpreter needs numpy<2.4, so the kernel
# tests cannot run with it), the tests of what runs there on the host side: the SmolLM2 GGUF load,
# evaluation, generation, export and the learning experiment. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/venv-gpu-versions}"
shift || true
if [ -z "${PYTHON:-}" ]; then
  if command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.12 >/dev/null 2>&1; then
    PYTHON="$(pyenv prefix 3.12)/bin/python3"
  else
    PYTHON=python3.12
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --disable-pip-version-check "torch==2.11.0" "triton==3.6.0"
clone="$(mktemp -d /tmp/gpu-versions-clone.XXXXXX)"
trap 'rm -rf "$clone"' EXIT
git clone -q . "$clone"
cd "$clone"
bash scripts/setup.sh --dev          # keeps the torch 2.11 just installed (setup.py admits >=2.11,<2.14)
python -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider "$@"
python -m pip install -q --disable-pip-version-check "numpy==2.5.2" 2>/dev/null
python -c "import numpy; print('numpy', numpy.__version__, '(the GPU machine\'s)')"
python -m pytest -q -p no:cacheprovider tests/test_assets.py tests/test_learn_experiment.py tests/test_eval.py \
  tests/test_generate.py tests/test_export.py

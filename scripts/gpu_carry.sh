#!/usr/bin/env bash
# Prepare, on this machine, what the GPU machine lacks (it has no package registry): run once after
# `bash scripts/setup.sh`. Writes two git-ignored folders that the device calls carry:
#   .whl/   liger-kernel, cut-cross-entropy and gguf wheels (the peers of the benchmarks; the GGUF reader)
#   .gpu/   the SmolLM2-135M GGUF (98 MB) in two parts, since one call carries at most 64 MiB
# Then, on the GPU machine, two back-to-back calls (the machine stays warm ~30 s between them):
#   1. carry [".gpu/smollm2.gguf.part_a"]:
#        mkdir -p /tmp/qs && cp .gpu/smollm2.gguf.part_a /tmp/qs/
#   2. carry [".whl", ".gpu/smollm2.gguf.part_b", "quietstar/data"]:
#        bash benchmarks/gpu_suite.sh $OUT        (it joins the parts and checks the sha256)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

grep -qxF "/.gpu/" .gitignore || echo "/.gpu/" >> .gitignore
if ! compgen -G ".whl/liger_kernel-*.whl" > /dev/null; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d .whl \
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1 gguf==0.19.0
fi
GGUF="$("$PY" -c "from quietstar.assets import smollm2_gguf_path; print(smollm2_gguf_path())")"
mkdir -p .gpu
rm -f .gpu/smollm2.gguf.part_*
# part_a 60 MB (carried alone), part_b the other 38 MB (carried with .whl and quietstar/data)
split -b 60000000 -a 1 "$GGUF" .gpu/smollm2.gguf.part_
ls -l .whl .gpu
du -sh .whl .gpu/smollm2.gguf.part_b quietstar/data
